"""Other optimizers cannot step WSI/WASI layers: they are refused at their first step, never a silent no-op.

A factored layer's gradient ∇W = G Pᵀ lives outside `.grad` (its `L`, `R` never get one), and a dense-weight
layer's ("reference"/"svd") factors must be re-derived after each step; only wasi.SubspaceSGD does either. Any
other torch optimizer would skip those parameters (no `.grad`) or leave the factors stale. A global optimizer
step pre-hook, installed when the first such layer is built, checks each optimizer once, at its first step.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["register_factors"]

_factors: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
_installed: list[bool] = []


def register_factors(*params: Tensor | None) -> None:
    """Mark parameters only wasi.SubspaceSGD may step (a WSI/WASI layer's L, R or its dense-mode weight)."""
    for p in params:
        if p is not None:
            _factors[id(p)] = p
    if not _installed:
        _installed.append(True)
        register_optimizer_step_pre_hook(_check)


def _check(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if getattr(optimizer, "steps_factored_layers", False) or optimizer.__dict__.get("_wasi_checked", False):
        return
    if any(_factors.get(id(p)) is p for group in optimizer.param_groups for p in group["params"]):
        raise RuntimeError(f"{type(optimizer).__name__} cannot update WSI/WASI layers (their gradient is kept "
                           "factored, outside .grad, and their factors must be re-derived each step): build "
                           "wasi.SubspaceSGD(model, lr, ...) for the model, which also steps every other parameter")
    optimizer.__dict__["_wasi_checked"] = True
