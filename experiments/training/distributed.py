"""Data-parallel setup for the loop: `torchrun --nproc_per_node=N train.py ...` (one process per device).

Without torchrun (WORLD_SIZE unset or 1) every helper here is the identity, so the loop reads the
same either way. With it: NCCL on GPU, Gloo on CPU; DistributedDataParallel averages the ordinary
`.grad`s; WSI/WASI factored gradients are averaged by wasi.distributed inside SubspaceSGD and
clip_grad_norm_. `trainer.batch_size` is per process: the global batch is N × batch_size.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from experiments.configuration.choices import Shuffle
from wasi.distributed import broadcast_factors_, factor_names

log = logging.getLogger(__name__)


class ReplicaDivergenceError(RuntimeError):
    """Ranks ended up with different weights (a gradient was not reduced somewhere)."""


@dataclass(frozen=True)
class Context:
    """This process's place in the job. rank 0 alone logs, checkpoints and writes results."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@contextlib.contextmanager
def process_group(device_type: str) -> Iterator[Context]:
    """Join torchrun's process group (env:// rendezvous) for the job's duration; NCCL for cuda, else Gloo.

    On CUDA each process uses device `cuda:LOCAL_RANK`. Ranks other than 0 log warnings only.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield Context()
        return
    ctx = Context(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    log.info("data parallel: %d processes (%s)", world_size, dist.get_backend())
    try:
        yield ctx
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """DistributedDataParallel over `model` (itself when not distributed).

    Every WSI/WASI layer's L, R are excluded (wasi.distributed.factor_names). Factored-mode L, R never
    get a `.grad` (SubspaceSGD averages their factored gradient itself); left to DDP, they would get
    dense all-zero grads, allocated and all-reduced every step. Their initial values are broadcast
    from rank 0 here, as DDP does for what it manages.
    """
    if not ctx.distributed:
        return model
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, factor_names(model))
    broadcast_factors_(model)
    device_ids = [ctx.local_rank] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids)


class EpochSampler(DistributedSampler):
    """This rank's share of one shuffled permutation per epoch, a function of (seed, epoch) only
    (DistributedSampler: shard k of N is permutation[k::N], padded so every rank has as many
    samples); `set_epoch(epoch, skip)` makes the next pass start `skip` samples in (resume).
    len() stays the whole shard.

    shuffle: "per_epoch" draws epoch e's permutation from a generator seeded `seed + e` (DistributedSampler's
    rule); "continued" draws every epoch's in turn from one generator seeded `seed`, one permutation per
    epoch (the shipped pretraining recipe's order).

    `generator` is the DataLoader's (it seeds the workers); set_epoch reseeds it too, so nothing
    about the data order needs saving beyond (epoch, position).
    """

    def __init__(self, dataset: Dataset, ctx: Context, seed: int, shuffle: Shuffle = "per_epoch"):
        super().__init__(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
        self.order = shuffle
        self.generator = torch.Generator()
        self.skip = 0
        self.set_epoch(0)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip
        self.generator.manual_seed(self.seed + epoch)

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0  # the skip applies to the next pass only
        orders = {"per_epoch": super().__iter__, "continued": self._continued}
        return itertools.islice(orders[self.order](), skip, None)

    def _continued(self) -> Iterator[int]:
        """This rank's shard of the (epoch + 1)-th permutation of one generator seeded `seed`."""
        g, n = torch.Generator().manual_seed(self.seed), len(self.dataset)  # type: ignore[arg-type]
        for _ in range(self.epoch):
            torch.randperm(n, generator=g)
        indices = torch.randperm(n, generator=g).tolist()
        indices += (indices * math.ceil(self.total_size / max(n, 1)))[:self.total_size - n]
        return iter(indices[self.rank:self.total_size:self.num_replicas])


def epoch_batches(loader: DataLoader, epoch: int, skip: int = 0) -> Iterator:
    """The batches of `epoch` (loader.sampler: an EpochSampler) from batch `skip` on, as an uninterrupted
    run sees them. Without workers the sampler skips the indices (nothing is loaded; the main process's
    random streams are restored from the checkpoint); with workers the skipped batches are loaded and
    dropped, so each worker's random stream (e.g. random flips) continues exactly too."""
    sampler = loader.sampler
    assert isinstance(sampler, EpochSampler) and loader.batch_size is not None
    if loader.num_workers == 0:
        sampler.set_epoch(epoch, skip * loader.batch_size)
        return iter(loader)
    sampler.set_epoch(epoch)
    return itertools.islice(loader, skip, None)


def shard(dataset: Dataset, ctx: Context) -> Dataset:
    """Items ctx.rank, ctx.rank + N, … of an evaluation split (no padding, no duplicates)."""
    if not ctx.distributed:
        return dataset
    return Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))  # type: ignore[arg-type]


def all_sum(values: list[float], ctx: Context, device: torch.device) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(value: object, ctx: Context) -> object:
    """Rank 0's value of a picklable object (e.g. the run folder, whose default name holds a timestamp)."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(value: object, ctx: Context) -> list[object]:
    """Every rank's value, in rank order (e.g. per-rank Tucker warm-start factors for a checkpoint)."""
    if not ctx.distributed:
        return [value]
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


@torch.no_grad()
def check_replicas_equal(model: nn.Module, ctx: Context) -> None:
    """Raise ReplicaDivergenceError unless every rank holds bit-identical parameters and buffers
    (compared through a float64 (sum, sum of squares, first element) fingerprint per tensor)."""
    if not ctx.distributed:
        return
    tensors = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.numel()]
    mine = torch.stack([torch.stack([t.double().sum(), t.double().square().sum(), t.flatten()[0].double()])
                        for t in tensors])
    every = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(every, mine)
    names = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.numel()]
    differ = [names[i] for i in range(len(tensors)) if any(not torch.equal(e[i], every[0][i]) for e in every)]
    if differ:
        raise ReplicaDivergenceError(f"ranks hold different weights after training in {differ[:5]} "
                                     f"({len(differ)} tensors): their gradients were not averaged over ranks.")
