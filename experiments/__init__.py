"""The experiment suite: builds model, data and method from a config, trains, measures, logs, deploys.

Entry points sit at this level (`python -m experiments.<name>`): run (the training loop, what train.py
calls), bench, gemm (dense product rates: PyTorch's GEMM against oneDNN), report, export, inference, pretrain,
tables. The rest is in packages named by role:

    training/       the loop's infrastructure: checkpoints, stop signals, LR schedules, processes, hardware,
                    logging, errors, writing files (storage), the run folder (its setting, owner, lock)
    builders/       model, method and variant construction; factor linears; the pretrained-like spectrum
    data/           datasets (their loaders, generated shapes and fractals) and the batches the loop reads
    measurement/    cost metrics (FLOPs, memory, time), energy, a run's results, the environment, memory units
    deployment/     the exported-model format and its loader
    configuration/  the config schema (types, allowed values, one-line errors), the Literal options,
                    settings as command-line overrides
"""
import logging
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"

# bitsandbytes (galore-torch's dependency, imported through PEFT) warns at import on CPUs with AVX512-BF16 that an
# optional 4-bit kernel package is missing; nothing here quantizes, so only its errors are shown.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
