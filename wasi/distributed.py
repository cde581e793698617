"""Data parallelism for factored layers: their gradient ∇W = G Pᵀ lives outside `.grad`, so
DistributedDataParallel never sees it; this averages it over ranks exactly, in factored form.

With n ranks, rank k holding ∇W_k = G_k P_kᵀ (G_k: (O, r_k), P_k: (I, r_k)),
    mean_k ∇W_k = [G_1 … G_n] / n · [P_1 … P_n]ᵀ,
so one all_gather along r gives every rank the same (G, P) and hence the same subspace update,
without any (O, I) tensor. P_k differs per rank (ASI/WASI Tucker factors are fitted to each rank's
activations; WSI's P_k is the rank's own input), so gathering is needed, not an all_reduce of G.
Everything here is a no-op unless torch.distributed is initialised with more than one rank.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from wasi.layers import WSILinear
from wasi.model import factored_layers

__all__ = ["all_gather_factored_grad", "broadcast_factors_", "factor_names", "is_distributed", "reduce_factored_grads"]


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_factored_grad(g: Tensor, p: Tensor, r_all: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Mean over ranks of G_k P_kᵀ in factored form. g: (O, r_k), p: (I, r_k) of this rank; r_all: every
    rank's r_k (r_k = 0 allowed) -> G: (O, Σ r_k) (already divided by n), P: (I, Σ r_k), identical on
    every rank. G and P travel as one (O + I, max r_k) zero-padded block per rank.
    """
    n, r_max = len(r_all), max(r_all)
    block = torch.cat([g, p.to(g.dtype)], 0)
    block = torch.nn.functional.pad(block, (0, r_max - block.shape[1])).contiguous()
    blocks = [torch.empty_like(block) for _ in range(n)]
    dist.all_gather(blocks, block)
    gathered = torch.cat([b[:, :r] for b, r in zip(blocks, r_all)], 1)
    o = g.shape[0]
    return gathered[:o] / n, gathered[o:].to(p.dtype)


@torch.no_grad()
def reduce_factored_grads(layers: Sequence[WSILinear]) -> None:
    """Replace each factored-mode layer's `factored_grad` by its mean over ranks (see module doc).

    Every rank must pass the same layers in the same order. Layers already reduced since their last
    backward (`factored_grad_reduced`, e.g. by clip_grad_norm_ before SubspaceSGD.step) are skipped,
    so calling this twice per step is free. A layer without a gradient on this rank counts as r_k = 0.
    """
    if not is_distributed():
        return
    todo = [l for l in layers if l.weight_update == "factored" and not l.factored_grad_reduced]
    if not todo:
        return
    device = next(t.device for t in todo[0].parameters())
    ranks = torch.tensor([0 if l.factored_grad is None else l.factored_grad[0].shape[1] for l in todo], device=device)
    every = [torch.empty_like(ranks) for _ in range(dist.get_world_size())]
    dist.all_gather(every, ranks)
    r_table = torch.stack(every).tolist()  # r_table[k][i]: rank k's r for layer i
    for i, layer in enumerate(todo):
        r_all = [row[i] for row in r_table]
        if max(r_all) > 0:
            g, p = layer.factored_grad if layer.factored_grad is not None else (
                layer.L.new_zeros(layer.out_features, 0), layer.L.new_zeros(layer.in_features, 0))
            layer.factored_grad = all_gather_factored_grad(g, p, r_all)
        layer.factored_grad_reduced = True


def factor_names(model: nn.Module) -> list[str]:
    """Qualified names of every WSI/WASI layer's `L`, `R`, which DDP must leave alone: in factored mode
    they are parameters that never get a `.grad` (`reduce_factored_grads` averages their gradient);
    in "reference"/"svd" mode they are buffers that SubspaceSGD re-derives identically on every rank."""
    return [f"{name}.{t}" for name, _ in factored_layers(model) for t in ("L", "R")]


@torch.no_grad()
def broadcast_factors_(model: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s L, R of every WSI/WASI layer to every rank (what DDP does for what it manages)."""
    if not is_distributed():
        return
    for name in factor_names(model):
        module_name, _, attr = name.rpartition(".")
        dist.broadcast(getattr(model.get_submodule(module_name), attr).data, src)
