"""The exported-model format (deployment.exported): what `python -m experiments.export` writes and what
inference loads with torch, timm, safetensors and wasi only."""
