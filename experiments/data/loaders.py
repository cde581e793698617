"""The loaders of one run and the batches its loop trains on (the `trainer` group: batch sizes, workers,
shuffling, max_steps).

A batch is `(inputs, labels)`: images (B, 3, S, S) and labels (B,); `to_device` also moves inputs that are
a mapping of tensors (token ids and an attention mask), so the loop reads the same for either.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from experiments.configuration.schema import invalid
from experiments.data.datasets import DataSplits
from experiments.training import distributed
from experiments.training.distributed import Context, EpochSampler

Batch = tuple[Any, torch.Tensor]


def to_device(batch: Batch, device: torch.device) -> Batch:
    """(inputs, labels) on `device`; inputs a tensor or a mapping of tensors."""
    inputs, labels = batch
    if isinstance(inputs, Mapping):
        return {k: v.to(device) for k, v in inputs.items()}, labels.to(device)
    return inputs.to(device), labels.to(device)


def first_batch(loader: Iterable[Batch], device: torch.device) -> Batch:
    """The loader's first batch on `device` (a method's calibration batch, the cost measurement's batch)."""
    return to_device(next(iter(loader)), device)


@dataclass
class Loaders:
    """train: this process's shard of every global batch; calibration: the global batches of epoch 0, the same
    on every process; val, test: this process's shard of each split. epochs and steps: what the run trains,
    `trainer.epochs` of `len(train)` batches, cut at `trainer.max_steps` (the one place that reads it)."""

    train: DataLoader
    calibration: DataLoader
    val: DataLoader
    test: DataLoader
    epochs: int
    steps: int
    device: torch.device
    progress_bar: bool = True

    def train_epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """Batches skip+1, skip+2, … of `epoch` on the device, as an uninterrupted run sees them (a resumed run
        skips those it trained), up to the run's last step."""
        per_epoch = len(self.train)
        end = min(per_epoch, self.steps - epoch * per_epoch)
        batches = itertools.islice(distributed.epoch_batches(self.train, epoch, skip), max(0, end - skip))
        shown = tqdm(batches, total=end, initial=skip, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                     disable=not self.progress_bar)
        return (to_device(batch, self.device) for batch in shown)


def build_loaders(data: DataSplits, trainer: DictConfig, ctx: Context, seed: int, device: torch.device) -> Loaders:
    """The run's loaders from `trainer` (batch_size per process, eval_batch_size, num_workers, shuffle, drop_last,
    epochs, max_steps). Each process trains on its shard of every global batch of ctx.world_size × batch_size."""
    sampler = EpochSampler(data.train, ctx, seed, trainer.shuffle)
    workers = trainer.num_workers
    train = DataLoader(data.train, trainer.batch_size, sampler=sampler, generator=sampler.generator,
                       num_workers=workers, drop_last=trainer.drop_last)
    calibration = DataLoader(data.train, trainer.batch_size * ctx.world_size, num_workers=workers,
                             sampler=EpochSampler(data.train, Context(), seed, trainer.shuffle))
    eval_batch = trainer.eval_batch_size or trainer.batch_size
    # Their own generators: an evaluation draws nothing from the global random stream, so evaluating once more
    # (a run cut by trainer.max_steps, then resumed) leaves the training that follows as it would have been.
    val = DataLoader(distributed.shard(data.val, ctx), eval_batch, num_workers=workers,
                     generator=torch.Generator().manual_seed(seed))
    test = DataLoader(distributed.shard(data.test, ctx), eval_batch, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed))
    if len(train) == 0:  # the data has images (experiments.data.datasets.check_splits), but not a full batch
        n = len(data.train)  # type: ignore[arg-type]
        raise invalid("trainer.batch_size", trainer.batch_size, "with trainer.drop_last=true leaves no training "
                      f"batch of the {n} training images",
                      f"trainer.batch_size={n} or less, or trainer.drop_last=false")
    steps = trainer.epochs * len(train)
    if trainer.max_steps is not None:
        steps = min(steps, trainer.max_steps)
    epochs = math.ceil(steps / len(train)) if len(train) else 0
    return Loaders(train, calibration, val, test, epochs, steps, device, progress_bar=ctx.is_main)
