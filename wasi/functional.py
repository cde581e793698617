"""Custom autograd for subspace linear layers: compressed saved input, gradients in compressed form.

Notation (docs/method.md, Activation subspace (ASI) and Compressed gradients): input x: (n_1, …, n_{d-1}, I),
output grad dy: (n_1, …, n_{d-1}, O), ∇W = dy_(unfold)ᵀ x_(unfold) = G Pᵀ with G: (O, r), P: (I, r).

The backward pieces (`input_grad`, `bias_grad`, `weight_grad`) are shared by `SubspaceLinearFn` and the
fused MLP of wasi.mlp.

A factored ∇W = G Pᵀ leaves the backward pass through autograd itself, as the gradients of two "carriers":
zero-stride leaf tensors of shapes (r, O) and (r, I) (4 bytes of storage each) that the layer makes in its
forward and passes to the Function, which returns Gᵀ and Pᵀ as their gradients (`factored_carriers`). So the
backward has no Python side effect, and torch.compile traces it like any other.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from wasi.subspace import cheapest_order, mode_product

__all__ = ["LinearParams", "SubspaceLinearFn", "bias_grad", "compute_dtype", "dense_weight_grad", "factor_product",
           "factored_carriers", "input_grad", "linear_forward", "linear_forward_with",
           "tucker_weight_grad", "weight_grad"]


def factored_carriers(r: int, out_features: int, in_features: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Two leaves requiring grad, (r, O) and (r, I) in like's dtype and device, with zero strides (one element of
    storage each): a Function taking them returns Gᵀ and Pᵀ as their gradients, which autograd leaves on their
    `.grad` (contiguous, so taken over without a copy)."""
    def leaf(n: int) -> Tensor:
        return torch.empty_strided((r, n), (0, 0), dtype=like.dtype, device=like.device, requires_grad=True)

    return leaf(out_features), leaf(in_features)


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
    return (core.reshape(-1, r).T @ z.reshape(-1, z.shape[-1])).T, factors[-1]  # G = (Sᵀ Z)ᵀ: Gᵀ contiguous


def dense_weight_grad(dy: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """∇W = G Pᵀ from a dense input, one column per token (r = T = ∏ leading dims; P is not orthonormal).

    dy: (…, O), x: (…, I) -> G = dy_(unfold)ᵀ: (O, T), P = x_(unfold)ᵀ: (I, T).
    """
    return dy.reshape(-1, dy.shape[-1]).T, x.reshape(-1, x.shape[-1]).T


@dataclass(frozen=True)
class LinearParams:
    """The weight of one subspace linear as its autograd Function sees it (held by reference, never saved).

    Dense: `weight` (O, I), L = R = None. Low rank: L (O, K), R (K, I); `weight` is then the dense
    parameter of the "reference"/"svd" updates (gets the dense ∇W) or None (factored: ∇W leaves through
    the carriers of `factored_carriers`).
    """

    weight: Tensor | None
    L: Tensor | None
    R: Tensor | None
    bias: Tensor | None


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
        u = factor_product(x, p.R.to(dtype))
        return factor_product(u, p.L.to(dtype), b), u


def linear_forward_with(x: Tensor, p: LinearParams, extra: Tensor) -> tuple[Tensor, Tensor]:
    """y = (x Rᵀ) Lᵀ + b of a low-rank weight, and x extraᵀ from the same product: x [R; extra]ᵀ, one pass over x.

    x: (…, I), extra: (m, I) -> y: (…, O), x extraᵀ: (…, m) (a column slice of the product, not contiguous).
    The fused MLP's output projection takes its Tucker step's feature-mode product a U^prev this way."""
    assert p.L is not None and p.R is not None
    dtype = x.dtype
    b = None if p.bias is None else p.bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        both = factor_product(x, torch.cat([p.R.to(dtype), extra.to(dtype)]))
        u, z = both.split([p.R.shape[0], extra.shape[0]], -1)
        return factor_product(u, p.L.to(dtype), b), z


def factor_product(x: Tensor, factor: Tensor, bias: Tensor | None = None) -> Tensor:
    """x factorᵀ + b (as F.linear) for one factor of a low-rank weight: x: (…, n), factor: (m, n) -> (…, m).

    float32 on the CPU goes through oneDNN, PyTorch's CPU kernel library (`torch.ops.mkldnn._linear_pointwise`,
    which inductor uses for CPU linears with constant weights), with the bias added in the product. MKL's matrix
    product, which F.linear calls, is slower for these thin shapes in a training step: a WASI ViT-B/32 step at
    batch 32 on 2 cores of an Intel Xeon, both ways interleaved in one process (10 rounds, medians), took
    1304 -> 1255 ms at ε = 0.4 (rank 61) and 1756 -> 1731 ms at ε = 0.8 (rank 246) with x Rᵀ, u Lᵀ + b and dy L
    through oneDNN; taking (dy L) R through it too gave no gain there, and on 2 cores of an AMD EPYC (dense
    linears through oneDNN as well) 1441 -> 1371 and 2282 -> 2187 ms. Elsewhere F.linear (CUDA adds the bias in
    the product too), under torch.compile, whose inductor takes this op only with constant weights and picks
    its own kernels, and under torch.jit tracing (fvcore's FLOP count), which cannot record the op.

    oneDNN gets dense operands: a factor laid out neither row- nor column-major (a view with padded rows) took
    2.7 s instead of 3.8 ms for a (3072, 246) x and a (246, 246) factor on the EPYC, and a transposed x 9.0 ms
    against 4.3 ms for copying it first and the product (2 threads, a scratch micro-benchmark), so such operands
    are copied."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and torch._C._has_mkldnn
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
        if not (factor.is_contiguous() or (factor.stride(0) == 1 and factor.stride(1) == factor.size(0))):
            factor = factor.contiguous()  # neither row- nor column-major
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), factor, bias, "none", [], "")
    return F.linear(x, factor, bias)


def input_grad(dy: Tensor, p: LinearParams) -> Tensor:
    """dx = dy W, or (dy L) R for a low-rank weight. dy: (…, O) -> (…, I), in dy.dtype."""
    if p.L is None:
        assert p.weight is not None
        return dy @ p.weight.to(dy.dtype)
    assert p.R is not None
    return factor_product(factor_product(dy, p.L.to(dy.dtype).T), p.R.to(dy.dtype).T)


def bias_grad(dy: Tensor, bias: Tensor) -> Tensor:
    """db = Σ dy over all but the last mode, in the bias dtype. dy: (…, O) -> (O,)."""
    return dy.reshape(-1, dy.shape[-1]).sum(0).to(bias.dtype)


def weight_grad(dy: Tensor, p: LinearParams, dense: bool, factored: bool, x: Tensor | None = None,
                core: Tensor | None = None, factors: Sequence[Tensor] = ()
                ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """∇W = G Pᵀ from the saved input: dense `x: (…, I)`, or its Tucker `core`/`factors` (from `tucker`, so a
    square factor is the identity; their leading modes may refine dy's, e.g. (B, H, W) for dy: (B, H·W, O)).

    Returns (dense ∇W: (O, I) in the weight dtype if `dense`, Gᵀ: (r, O) and Pᵀ: (r, I) if `factored`, the
    carriers' gradients; each None when not asked for). dy: (…, O).
    """
    if not (dense or factored):
        return None, None, None
    if core is None:
        assert x is not None
        g, pm = dense_weight_grad(dy, x)
    else:
        lead = [u.shape[0] for u in factors[:-1]]
        g, pm = tucker_weight_grad(dy.reshape(*lead, dy.shape[-1]), core, factors,
                                   [u.shape[0] == u.shape[1] for u in factors])
    dw = None
    if dense:
        assert p.weight is not None
        dw = (g @ pm.T).to(p.weight.dtype)
    return (dw, g.T, pm.T.contiguous()) if factored else (dw, None, None)


class SubspaceLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b (dense `weight`, L = R = None) or y = (x Rᵀ) Lᵀ + b (factors L: (O, K), R: (K, I)).

    Saves for backward only the Tucker factors of x (`core` and `factors` given, as `tucker` returns
    them) or x itself (`core` None). Everything runs in x.dtype with autocast off; parameters are cast to it.
    Backward: dx = dy W, or (dy L) R when L is given; db = Σ dy over all but the last mode;
    ∇W = G Pᵀ (docs/method.md, Compressed gradients) is returned as the dense grad of `weight` when that
    requires grad (ASI, and WSI/WASI with the "reference"/"svd" updates), and as Gᵀ, Pᵀ, the grads of the
    carriers `g_carrier`: (r, O), `p_carrier`: (r, I) (`factored_carriers`) when they are given (factored
    update), in which case L and R themselves get no grad. Parameters are held by reference, not saved, so they
    must not change in place between this forward and its backward (optimizer steps come after backward).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, L: Tensor | None, R: Tensor | None,
                bias: Tensor | None, g_carrier: Tensor | None, p_carrier: Tensor | None, core: Tensor | None,
                *factors: Tensor) -> Tensor:
        params = LinearParams(weight, L, R, bias)
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
            factored = need[5] or need[6]
            if ctx.tucker:
                dw, gt, pt = weight_grad(dy, p, need[1], factored, core=saved[0], factors=saved[1:])
            else:
                dw, gt, pt = weight_grad(dy, p, need[1], factored, x=saved[0])
        return (dx, dw, None, None, db, gt, pt, None) + (None,) * (len(saved) - 1 if ctx.tucker else 0)
