"""Where and how a run computes: device, CPU threads, mixed precision, seeds (the `hardware` group)."""
from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Callable

import numpy as np
import torch
from omegaconf import DictConfig

from experiments.configuration.choices import Precision
from experiments.configuration.schema import ConfigError

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
