"""Learning-rate schedules (the `scheduler` config group): what the loop steps after every optimizer step.

Each conf/scheduler/*.yaml is a partial of one function here; the loop calls it with the optimizer and the
number of optimizer steps per epoch:

    scheduler = hydra.utils.instantiate(cfg.scheduler)(optimizer, steps_per_epoch=len(train_loader))
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler


class PerEpoch:
    """A per-epoch torch scheduler stepped by the loop after every optimizer step: it moves on at the last
    step of each epoch, so its state follows the step count (a run resumed mid-epoch continues it exactly)."""

    def __init__(self, scheduler: LRScheduler, steps_per_epoch: int):
        self.scheduler, self.steps_per_epoch, self.steps = scheduler, steps_per_epoch, 0

    def step(self) -> None:
        self.steps += 1
        if self.steps % self.steps_per_epoch == 0:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]


def cosine(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, min_lr_ratio: float) -> PerEpoch:
    """Cosine annealing once per epoch (torch's CosineAnnealingLR, T_max = epochs) from the optimizer's lr
    down to min_lr_ratio × lr: the paper's schedule."""
    base_lr = optimizer.param_groups[0]["lr"]
    return PerEpoch(CosineAnnealingLR(optimizer, T_max=epochs, eta_min=min_lr_ratio * base_lr), steps_per_epoch)


def warmup_cosine(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: float,
                  min_lr_ratio: float) -> LambdaLR:
    """Per optimizer step: lr × warmup_cosine_factor(step) over the epochs × steps_per_epoch steps, warming up
    for round(warmup_epochs × steps_per_epoch) of them."""
    factor = functools.partial(warmup_cosine_factor, total=epochs * steps_per_epoch,
                               warmup=round(warmup_epochs * steps_per_epoch), min_ratio=min_lr_ratio)
    return LambdaLR(optimizer, factor)


def warmup_cosine_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps (1/warmup at step 0, 1 at step warmup - 1), then cosine from 1 down
    to `min_ratio` at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
