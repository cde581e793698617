"""One fine-tuning variant: a model from the `model` group with a `method` applied, and its optimizer.

The training loop and the benchmark (`experiments.bench`) build variants with the same function,
so a benchmark row measures exactly what a training run trains.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

import wasi
from experiments.builders.inputs import Inputs, logits
from experiments.builders.models import build_model
from experiments.builders.spectrum import pretrained_like_
from experiments.configuration.choices import Spectrum
from experiments.data.loaders import Batch
from experiments.training.hardware import set_dense_linears


@dataclass
class Variant:
    """model: the model after `method.apply`; method: the `experiments.builders.methods` object;
    optimizer: from `method.build_optimizer`; summary: what `apply` reported (JSON-able); tuned: the target layers
    the method fine-tunes (those of the last `method.last_n` blocks), named before it converted them: the layers
    the paper's per-layer costs count (experiments.measurement.metrics.measure)."""

    model: nn.Module
    method: Any
    optimizer: torch.optim.Optimizer
    summary: dict
    tuned: list[str] = field(default_factory=list)


def build_variant(cfg: DictConfig, num_classes: int, calibration: Iterable[Batch], device: torch.device,
                  spectrum: Spectrum = "random") -> Variant:
    """Build `cfg.model` with a `num_classes` head on `device`, apply `cfg.method` (it may read
    calibration batches (x, y): images (B, 3, S, S) or token ids and masks (B, L), labels (B,)) and build its
    optimizer from `cfg.optimizer`.

    spectrum="pretrained" (benchmarks only) first gives the method's target weights the pretrained-like
    spectrum of `experiments.builders.spectrum`; "random" keeps the weights as built.
    """
    model = build_model(cfg.model, num_classes).to(device)
    targets = wasi.find_targets(model, cfg.method.get("targets", "mlp"),
                                target_modules=cfg.method.get("target_modules"))
    if spectrum == "pretrained":
        pretrained_like_(model, targets)
    method = hydra.utils.instantiate(cfg.method)
    summary = method.apply(model, calibration, device)
    set_dense_linears(model, cfg.hardware)  # the linears the method left dense: nn.Linear's kernel or oneDNN's
    optimizer = method.build_optimizer(model, hydra.utils.instantiate(cfg.optimizer))
    return Variant(model, method, optimizer, summary, wasi.tuned_targets(model, targets, cfg.method.get("last_n")))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Inputs, y: torch.Tensor,
               grad_clip: float | None, amp: contextlib.AbstractContextManager,
               clock: Callable[[], None] = lambda: None, *, scheduler: Any = None,
               clip: Callable[[nn.Module, float], Any] = wasi.clip_grad_norm_,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """One optimizer step on a batch x: images (B, 3, H, W) or token ids and masks (B, L) (experiments.builders.
    inputs), y: (B,); returns the loss (detached).

    Cross-entropy (with `label_smoothing`), then gradients clipped to a global norm of `grad_clip` by
    `clip(model, grad_clip)` (the method's `clip_grad_norm_`; None: no clipping), then the optimizer step
    and, given one, the LR scheduler's step (a `scheduler` group's: stepped after every optimizer step).
    `clock` is called after the forward (model + loss), after the backward and after the optimizer
    step (clipping included): the benchmark times the three phases with it.
    """
    with amp:
        loss = F.cross_entropy(logits(model, x), y, label_smoothing=label_smoothing)
    clock()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clock()
    if grad_clip:
        clip(model, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    clock()
    return loss.detach()
