"""The suite's options with a fixed set of values, as `Literal` types: mypy checks the code that passes
them, and the schema's runtime rule for each is its arguments (schema.one_of_literal). WSI/WASI's own
options (recompute modes, targets, weight updates) are the library's (wasi.WASIConfig)."""
from __future__ import annotations

from typing import Literal

Device = Literal["cpu", "cuda"]  # hardware.device
Precision = Literal["fp32", "bf16"]  # hardware.precision
DenseLinear = Literal["aten", "onednn"]  # hardware.dense_linear
LoggerMode = Literal["offline", "online", "disabled"]  # logger.mode
Shuffle = Literal["per_epoch", "continued"]  # trainer.shuffle (experiments.training.distributed.EpochSampler)
Recompute = Literal["none", "attn", "block"]  # method.recompute of vanilla, LoRA, SVD-LLM ("mlp" needs WSI/WASI)
Finetune = Literal["lora", "factors"]  # method.finetune of SVD-LLM
Spectrum = Literal["random", "pretrained"]  # the benchmark's target weights (experiments.builders.variant)
#: model.inputs and dataset.inputs: images (B, 3, S, S), or token ids and a mask (B, L)
Inputs = Literal["image", "text"]
