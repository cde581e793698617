"""Where and how a run computes: device, CPU threads, mixed precision, the kernel of dense linears, seeds (the
`hardware` group)."""
from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from experiments.configuration.choices import DenseLinear, Precision
from experiments.configuration.schema import ConfigError, check_dense_linear
from wasi.functional import factor_product

log = logging.getLogger(__name__)


def setup_hardware(hw: DictConfig, local_rank: int = 0) -> torch.device:
    """The device of this process (`cuda:local_rank` under torchrun) and the CPU thread count; warns once when
    `hardware.threads` is more than the CPUs this process may run on (the threads would take turns)."""
    if hw.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("hardware=cuda but no CUDA device is visible. "
                          "Fix: run on a GPU machine or use hardware=cpu.")
    if hw.threads:
        cpus = usable_cpus()
        if hw.threads > cpus:
            log.warning("hardware.threads=%d is more than the %d CPUs this process may use: the threads take turns "
                        "and every step runs slower. Fix: hardware.threads=%d (or fewer)", hw.threads, cpus, cpus)
        torch.set_num_threads(hw.threads)
    return torch.device("cuda", local_rank) if hw.device == "cuda" else torch.device(hw.device)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's limit), else all."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def autocast(hw: DictConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for `hardware.precision=bf16`, nothing for fp32 (the values: configuration.choices.Precision)."""
    contexts: dict[Precision, Callable[[], contextlib.AbstractContextManager]] = {
        "fp32": contextlib.nullcontext, "bf16": lambda: torch.autocast(device.type, dtype=torch.bfloat16)}
    return contexts[hw.precision]()


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and CUDA) random streams."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _OneDNNLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b with all three products through `wasi.functional.factor_product` (oneDNN on a float32 CPU);
    x is saved only when W trains, as autograd's own linear does. x: (…, in), W: (out, in) -> (…, out)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        return factor_product(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        rows = dy.reshape(-1, dy.shape[-1])
        dx = factor_product(dy, weight.T) if need_x else None
        dw = factor_product(rows.T, x.reshape(-1, x.shape[-1]).T) if need_w else None
        return dx, dw, rows.sum(0) if need_b else None


class OneDNNLinear(nn.Linear):
    """nn.Linear (same parameters, same state_dict) whose forward and backward products run through oneDNN."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and not torch.jit.is_tracing():  # a trace (fvcore) would see an opaque op
            return _OneDNNLinearFn.apply(x, self.weight, self.bias)
        return factor_product(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> int:
    """Make every plain nn.Linear of `model` (trained or frozen, the method's converted layers aside) a
    OneDNNLinear in place; returns how many."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    for m in linears:
        m.__class__ = OneDNNLinear
    return len(linears)


DENSE_LINEARS: dict[DenseLinear, Callable[[nn.Module], int]] = {"aten": lambda model: 0,
                                                                "onednn": use_onednn_linears}


def set_dense_linears(model: nn.Module, hw: DictConfig) -> None:
    """`hardware.dense_linear`: aten keeps nn.Linear as PyTorch runs it (MKL's GEMM on x86), onednn runs every
    dense linear's products through oneDNN (`use_onednn_linears`; float32 on the CPU only)."""
    check_dense_linear(hw)
    if n := DENSE_LINEARS[hw.dense_linear](model):
        log.info("hardware.dense_linear=onednn: %d nn.Linear layers run through oneDNN", n)
