"""Custom autograd for subspace linear layers: compressed saved input, gradients in compressed form.

Notation (method page, sections 3-4): input x: (n_1, …, n_{d-1}, I), output grad dy: (n_1, …, n_{d-1}, O),
∇W = dy_(unfold)ᵀ x_(unfold) = G Pᵀ with G: (O, r), P: (I, r).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from wasi.subspace import mode_product

__all__ = ["compute_dtype", "tucker_weight_grad", "dense_weight_grad", "SubspaceLinearFn"]


class FactoredGradSink(Protocol):
    def accumulate_factored_grad(self, g: Tensor, p: Tensor) -> None: ...


def compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device, else x.dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def tucker_weight_grad(dy: Tensor, core: Tensor, factors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """∇W = G Pᵀ from a Tucker-compressed input, never forming an (O, I) matrix.

    dy: (n_1, …, n_{d-1}, O), core: (r_1, …, r_d), factors [U_m: (n_m, r_m)] -> G: (O, r_d), P = U_d: (I, r_d).
    3-way: Z₁ = dy ×₁ U₁ᵀ, Z₂ = Z₁ ×₂ U₂ᵀ, G[o, d] = Σ_{a,c} Z₂[a, c, o] S[a, c, d].
    """
    z = dy
    for mode, u in enumerate(factors[:-1]):
        z = mode_product(z, u.T, mode)
    lead = list(range(core.dim() - 1))
    return torch.tensordot(z, core, dims=(lead, lead)), factors[-1]


def dense_weight_grad(dy: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """∇W = G Pᵀ from a dense input, one column per token (r = T = ∏ leading dims; P is not orthonormal).

    dy: (…, O), x: (…, I) -> G = dy_(unfold)ᵀ: (O, T), P = x_(unfold)ᵀ: (I, T).
    """
    return dy.reshape(-1, dy.shape[-1]).T, x.reshape(-1, x.shape[-1]).T


class SubspaceLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b (dense `weight`, L = R = None) or y = (x Rᵀ) Lᵀ + b (factors L: (O, K), R: (K, I)).

    Saves for backward only the Tucker factors of x (`core` and `factors` given) or x itself (`core`
    None). Everything runs in x.dtype with autocast off; parameters are cast to it.
    Backward: dx = dy W, or (dy L) R when L is given; db = Σ dy over all but the last mode;
    ∇W = G Pᵀ (section 4) is returned as the dense grad of `weight` when that requires grad
    (ASI, and WSI/WASI in reference mode), and is handed to `sink.accumulate_factored_grad(G, P)`
    when L or R requires grad (factored mode), in which case L and R themselves get no grad.
    Parameters are held by reference, not saved, so they must not change in place between this
    forward and its backward (optimizer steps come after backward).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, L: Tensor | None, R: Tensor | None, bias: Tensor | None,
                sink: FactoredGradSink | None, core: Tensor | None, *factors: Tensor) -> Tensor:
        dtype = x.dtype
        b = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x, weight.to(dtype), b) if L is None else F.linear(F.linear(x, R.to(dtype)), L.to(dtype), b)
        ctx.save_for_backward(*((x,) if core is None else (core, *factors)))
        ctx.tucker = core is not None
        ctx.params = (weight, L, R, bias)
        ctx.sink = sink
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        weight, L, R, bias = ctx.params
        saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            if need[0]:
                dx = dy @ weight.to(dy.dtype) if L is None else (dy @ L.to(dy.dtype)) @ R.to(dy.dtype)
            if need[4]:
                db = dy.reshape(-1, dy.shape[-1]).sum(0).to(bias.dtype)
            factored = ctx.sink is not None and (need[2] or need[3])
            if need[1] or factored:
                g, p = tucker_weight_grad(dy, saved[0], saved[1:]) if ctx.tucker else dense_weight_grad(dy, saved[0])
                if need[1]:
                    dw = (g @ p.T).to(weight.dtype)
                if factored:
                    ctx.sink.accumulate_factored_grad(g, p)
        return (dx, dw, None, None, db, None, None) + (None,) * (len(saved) - 1 if ctx.tucker else 0)
