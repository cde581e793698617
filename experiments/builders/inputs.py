"""What a model takes and how its logits come out: the one place where image and text batches differ.

A batch is `(inputs, labels)`, labels (B,). The inputs are what the model's config says it takes (`model.inputs`):
- images x: (B, 3, S, S), passed positionally: `model(x)` (timm; a Hugging Face image classifier reads them as
  its `pixel_values`);
- text: a mapping of keyword tensors (B, L), `input_ids` and `attention_mask` (Hugging Face sequence classifiers),
  passed as keywords: `model(**x)`.
A timm model returns the logits (B, C); a Hugging Face model an output object holding them as `.logits`. Everything
that runs a model on a batch (the training step, the evaluation, the cost measurement, the benchmark, export) goes
through `logits`, and everything that slices, joins or moves inputs through `take`, `concat` and `move`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

Inputs = Tensor | Mapping[str, Tensor]


def logits(model: nn.Module, inputs: Inputs) -> Tensor:
    """The model's logits (B, C) for a batch of inputs: `model(x)` for images, `model(**x)` for keyword tensors; a
    Hugging Face output gives its `.logits`."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    return out if isinstance(out, Tensor) else out.logits


def take(inputs: Inputs, n: int) -> Inputs:
    """The first n samples of a batch of inputs (each tensor's first n rows)."""
    if isinstance(inputs, Mapping):
        return {k: v[:n] for k, v in inputs.items()}
    return inputs[:n]


def concat(parts: Sequence[Inputs]) -> Inputs:
    """Batches of inputs joined along the batch axis (key by key for keyword tensors)."""
    first = parts[0]
    if isinstance(first, Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in first}  # type: ignore[index]
    return torch.cat(list(parts))  # type: ignore[arg-type]


def move(inputs: Inputs, device: torch.device | str) -> Inputs:
    """The inputs on `device`."""
    if isinstance(inputs, Mapping):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def size(inputs: Inputs) -> int:
    """The number of samples in a batch of inputs."""
    return len(next(iter(inputs.values()))) if isinstance(inputs, Mapping) else len(inputs)


def sample_name(inputs: Inputs) -> str:
    """What one sample is, for per-sample metric keys (`flops/inference_per_image`, `..._per_sequence`)."""
    return "sequence" if isinstance(inputs, Mapping) else "image"


def data_arguments(model: DictConfig) -> dict[str, Any]:
    """What a dataset config's builder needs from the model config to prepare its inputs: `image_size` for an image
    model (experiments.data.datasets.build_datasets); the model's tokenizer and `max_length` for a text model
    (experiments.data.text.build_text_datasets)."""
    if model.get("inputs", "image") == "text":
        from experiments.builders.hub import load_tokenizer

        return {"tokenizer": load_tokenizer(model), "max_length": int(model.max_length)}
    return {"image_size": int(model.image_size)}
