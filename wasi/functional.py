"""Custom autograd for subspace linear layers: compressed saved input, gradients in compressed form.

Notation (docs/method.md, Activation subspace (ASI) and Compressed gradients): input x: (n_1, …, n_{d-1}, I),
output grad dy: (n_1, …, n_{d-1}, O), ∇W = dy_(unfold)ᵀ x_(unfold) = G Pᵀ with G: (O, r), P: (I, r).

The backward pieces (`input_grad`, `bias_grad`, `weight_grad`) are shared by `SubspaceLinearFn` and the
fused MLP of wasi.mlp.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from wasi.subspace import cheapest_order, mode_product

__all__ = ["LinearParams", "SubspaceLinearFn", "bias_grad", "compute_dtype", "dense_weight_grad", "input_grad",
           "linear_forward", "tucker_weight_grad", "weight_grad"]


class FactoredGradSink(Protocol):
    def accumulate_factored_grad(self, g: Tensor, p: Tensor) -> None: ...


def compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device, else x.dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


@record_function("wasi.compressed_grad")
def tucker_weight_grad(dy: Tensor, core: Tensor, factors: Sequence[Tensor],
                       identity: Sequence[bool] | None = None) -> tuple[Tensor, Tensor]:
    """∇W = G Pᵀ from a Tucker-compressed input, never forming an (O, I) matrix.

    dy: (n_1, …, n_{d-1}, O), core: (r_1, …, r_d), factors [U_m: (n_m, r_m)] -> G: (O, r_d), P = U_d: (I, r_d).
    3-way: Z₁ = dy ×₁ U₁ᵀ, Z₂ = Z₁ ×₂ U₂ᵀ, G[o, d] = Σ_{a,c} Z₂[a, c, o] S[a, c, d]: mode products on
    views of dy (in the cheapest order, `wasi.subspace.cheapest_order`), then one matmul with the core.
    identity[m] True says U_m = I (as `tucker` returns for r_m = n_m), and that mode is not contracted.
    """
    lead = list(factors[:-1])
    skip = [False] * len(lead) if identity is None else list(identity[:-1])
    z = dy.contiguous()
    ranks = [u.shape[1] for u in lead] + [z.shape[-1]]
    for mode in cheapest_order(z.shape, ranks, [m for m in range(len(lead)) if not skip[m]]):
        z = mode_product(z, lead[mode].T, mode)
    r = core.shape[-1]
    return z.reshape(-1, z.shape[-1]).T @ core.reshape(-1, r), factors[-1]


def dense_weight_grad(dy: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """∇W = G Pᵀ from a dense input, one column per token (r = T = ∏ leading dims; P is not orthonormal).

    dy: (…, O), x: (…, I) -> G = dy_(unfold)ᵀ: (O, T), P = x_(unfold)ᵀ: (I, T).
    """
    return dy.reshape(-1, dy.shape[-1]).T, x.reshape(-1, x.shape[-1]).T


@dataclass(frozen=True)
class LinearParams:
    """The weight of one subspace linear as its autograd Function sees it (held by reference, never saved).

    Dense: `weight` (O, I), L = R = None. Low rank: L (O, K), R (K, I); `weight` is then the dense
    parameter of the "reference"/"svd" updates (gets the dense ∇W) or None (factored: ∇W goes to `sink`).
    """

    weight: Tensor | None
    L: Tensor | None
    R: Tensor | None
    bias: Tensor | None
    sink: FactoredGradSink | None


def linear_forward(x: Tensor, p: LinearParams) -> tuple[Tensor, Tensor | None]:
    """y = x Wᵀ + b, or u = x Rᵀ and y = u Lᵀ + b, in x.dtype with autocast off.

    x: (…, I) -> y: (…, O), u: (…, K) (None for a dense weight)."""
    dtype = x.dtype
    b = None if p.bias is None else p.bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        if p.L is None:
            assert p.weight is not None
            return F.linear(x, p.weight.to(dtype), b), None
        assert p.R is not None
        u = F.linear(x, p.R.to(dtype))
        return F.linear(u, p.L.to(dtype), b), u


def input_grad(dy: Tensor, p: LinearParams) -> Tensor:
    """dx = dy W, or (dy L) R for a low-rank weight. dy: (…, O) -> (…, I), in dy.dtype."""
    if p.L is None:
        assert p.weight is not None
        return dy @ p.weight.to(dy.dtype)
    assert p.R is not None
    return (dy @ p.L.to(dy.dtype)) @ p.R.to(dy.dtype)


def bias_grad(dy: Tensor, bias: Tensor) -> Tensor:
    """db = Σ dy over all but the last mode, in the bias dtype. dy: (…, O) -> (O,)."""
    return dy.reshape(-1, dy.shape[-1]).sum(0).to(bias.dtype)


def weight_grad(dy: Tensor, p: LinearParams, dense: bool, factored: bool, x: Tensor | None = None,
                core: Tensor | None = None, factors: Sequence[Tensor] = ()) -> Tensor | None:
    """∇W = G Pᵀ from the saved input: dense `x: (…, I)`, or its Tucker `core`/`factors` (from `tucker`, so a
    square factor is the identity; their leading modes may refine dy's, e.g. (B, H, W) for dy: (B, H·W, O)).

    factored: hand (G, P) to `p.sink.accumulate_factored_grad`. dense: return G Pᵀ (O, I) in the weight
    dtype (else None). dy: (…, O).
    """
    if not (dense or factored):
        return None
    if core is None:
        assert x is not None
        g, pm = dense_weight_grad(dy, x)
    else:
        lead = [u.shape[0] for u in factors[:-1]]
        g, pm = tucker_weight_grad(dy.reshape(*lead, dy.shape[-1]), core, factors,
                                   [u.shape[0] == u.shape[1] for u in factors])
    if factored:
        assert p.sink is not None
        p.sink.accumulate_factored_grad(g, pm)
    if not dense:
        return None
    assert p.weight is not None
    return (g @ pm.T).to(p.weight.dtype)


class SubspaceLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b (dense `weight`, L = R = None) or y = (x Rᵀ) Lᵀ + b (factors L: (O, K), R: (K, I)).

    Saves for backward only the Tucker factors of x (`core` and `factors` given, as `tucker` returns
    them) or x itself (`core` None). Everything runs in x.dtype with autocast off; parameters are cast to it.
    Backward: dx = dy W, or (dy L) R when L is given; db = Σ dy over all but the last mode;
    ∇W = G Pᵀ (docs/method.md, Compressed gradients) is returned as the dense grad of `weight` when that
    requires grad (ASI, and WSI/WASI with the "reference"/"svd" updates), and is handed to
    `sink.accumulate_factored_grad(G, P)` when L or R requires grad (factored update), in which case L and R
    themselves get no grad. Parameters are held by reference, not saved, so they must not change in place
    between this forward and its backward (optimizer steps come after backward).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, L: Tensor | None, R: Tensor | None,
                bias: Tensor | None, sink: FactoredGradSink | None, core: Tensor | None, *factors: Tensor) -> Tensor:
        params = LinearParams(weight, L, R, bias, sink)
        y, _ = linear_forward(x, params)
        ctx.save_for_backward(*((x,) if core is None else (core, *factors)))
        ctx.tucker = core is not None
        ctx.params = params
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        p: LinearParams = ctx.params
        saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = db = None
        with torch.autocast(dy.device.type, enabled=False):
            if need[0]:
                dx = input_grad(dy, p)
            if need[4]:
                assert p.bias is not None
                db = bias_grad(dy, p.bias)
            factored = p.sink is not None and (need[2] or need[3])
            if ctx.tucker:
                dw = weight_grad(dy, p, need[1], factored, core=saved[0], factors=saved[1:])
            else:
                dw = weight_grad(dy, p, need[1], factored, x=saved[0])
        return (dx, dw, None, None, db, None, None) + (None,) * (len(saved) - 1 if ctx.tucker else 0)
