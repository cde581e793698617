"""Low-rank MLP recompute: a timm `Mlp` with WSI/WASI fc1 and fc2 that saves nothing of the hidden width.

fc1 computes u = x R₁ᵀ: (…, K₁) on its way to h = u L₁ᵀ + b₁: (…, H). Backward needs act'(h) and, for WSI,
fc2's dense input act(h); both are recomputed from u, so the MLP saves (…, K₁) instead of (…, H)
(docs/method.md, Whole-step recompute). Extra cost: one (…, K₁)×(K₁, H) product and the activation per step.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wasi.functional import LinearParams, bias_grad, compute_dtype, input_grad, linear_forward, weight_grad
from wasi.layers import WSILinear

__all__ = ["RecomputeMlp"]


class RecomputeMlp(nn.Module):
    """timm `Mlp` (fc1 -> act -> drop1 -> norm -> fc2 -> drop2) whose fc1, fc2 are WSILinear/WASILinear (any
    weight update), with dropout p = 0 and no hidden norm. Same submodules, so the same state_dict keys
    (`fc1.L`, `fc1.R`, `fc1.bias`, `fc2.…`) and the same layers for the optimizer, clipping and memory reports.

    Training forward, x: (…, I) (in the autocast dtype under autocast, as SubspaceLinearFn):
        u = x R₁ᵀ (…, K₁),  h = u L₁ᵀ + b₁ (…, H),  a = act(h),  y = (a R₂ᵀ) L₂ᵀ + b₂ (…, O).
    Saved for backward: fc1's input as that layer saves it (Tucker S, U_m of x for WASI; x for WSI), u, and
    for WASI fc2's Tucker S, U_m of a; nothing of size (…, H). Backward: dA = (dy L₂) R₂; h = u L₁ᵀ + b₁ is
    recomputed (and a = act(h) for WSI's fc2); dh = act'(h) ⊙ dA; fc2's ∇W from its Tucker factors (WASI) or from the
    recomputed a (WSI); dx = (dh L₁) R₁; fc1's ∇W from its saved input; biases Σ dy, Σ dh. The gradients
    are those of the plain Mlp with the same layers. Eval mode or no grad: the plain path.
    """

    fc1: WSILinear
    fc2: WSILinear

    def __init__(self, fc1: WSILinear, act: nn.Module, fc2: WSILinear):
        super().__init__()
        self.fc1, self.act = fc1, act
        self.drop1, self.norm = nn.Identity(), nn.Identity()
        self.fc2, self.drop2 = fc2, nn.Identity()

    @staticmethod
    def check(mlp: nn.Module) -> None:
        """ValueError naming the fix unless `mlp` is a timm Mlp without dropout or hidden norm (fc1, fc2 unchecked)."""
        children = dict(mlp.named_children())
        if set(children) != {"fc1", "act", "drop1", "norm", "fc2", "drop2"}:
            raise ValueError(f"recompute='mlp' needs a timm Mlp (fc1, act, drop1, norm, fc2, drop2), got "
                             f"{type(mlp).__name__} with {sorted(children)}; set recompute='none' or 'block'")
        for name in ("drop1", "drop2"):
            drop = children[name]
            if not (isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and drop.p == 0)):
                raise ValueError(f"recompute='mlp' does not replay dropout inside the MLP ({name}: {drop}); set the "
                                 "model's MLP dropout to 0, or recompute='none' or 'block'")
        if not isinstance(children["norm"], nn.Identity):  # a configuration error, hence ValueError
            raise ValueError(  # noqa: TRY004
                f"recompute='mlp' does not recompute a hidden norm inside the MLP ({children['norm']}); "
                "set recompute='none' or 'block'")

    @classmethod
    def from_mlp(cls, mlp: nn.Module) -> RecomputeMlp:
        """From a timm Mlp whose fc1, fc2 were converted to WSI/WASI layers; ValueError naming the fix otherwise."""
        cls.check(mlp)
        fc1, act, fc2 = mlp.get_submodule("fc1"), mlp.get_submodule("act"), mlp.get_submodule("fc2")
        if not (isinstance(fc1, WSILinear) and isinstance(fc2, WSILinear)):  # a configuration error
            raise ValueError(  # noqa: TRY004
                f"recompute='mlp' recomputes fc1's output from its low-rank x Rᵀ, so fc1 and fc2 must be WSI/WASI "
                f"layers, got {type(fc1).__name__}, {type(fc2).__name__}; set recompute='none' or 'block'")
        new = cls(fc1, act, fc2)
        new.train(mlp.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        """x: (…, I) -> (…, O)."""
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if not (self.training and needs_grad):
            return self.fc2(self.act(self.fc1(x)))
        x = x.to(compute_dtype(x))
        core, factors = self.fc1._compress(x)
        w1, L1, R1 = self.fc1._fn_weights()
        w2, L2, R2 = self.fc2._fn_weights()
        carriers = (*self.fc1._carriers(x.shape, x), *self.fc2._carriers((*x.shape[:-1], self.fc1.out_features), x))
        replayed = self.fc2._replayed()  # fc2's compression of a checkpointed block's first forward, when recomputing
        second = [] if replayed is None or replayed[0] is None else [replayed[0], *replayed[1]]
        y, *compressed = _RecomputeMlpFn.apply(x, w1, L1, R1, self.fc1.bias, w2, L2, R2, self.fc2.bias, self,
                                               *carriers, replayed is not None, len(factors), core, *factors, *second)
        if replayed is None:  # fc2's Tucker step ran inside the Function, which returned it: its side effects here
            a_bytes = x.numel() // x.shape[-1] * self.fc1.out_features * x.element_size()
            self.fc2._remember(a_bytes, compressed[0] if compressed else None, compressed[1:])
        return y


class _RecomputeMlpFn(torch.autograd.Function):
    """The fused MLP of RecomputeMlp. Inputs 0-8: x, then (weight, L, R, bias) of fc1 and of fc2; 9: the module;
    10-13: the factored-∇W carriers (Gᵀ, Pᵀ) of fc1 and of fc2 (wasi.functional.factored_carriers) or None;
    14: whether fc2's compression is given (a recomputation replaying it) or taken here; 15: n, the number of
    fc1's Tucker factors; 16: fc1's core; then fc1's n factors and, if given, fc2's core and factors.
    Outputs: y, then fc2's core and factors when this forward took its Tucker step (non-differentiable), so
    that the module, not the Function, keeps them (no side effect inside the Function)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w1: Tensor | None, L1: Tensor, R1: Tensor, b1: Tensor | None,
                w2: Tensor | None, L2: Tensor, R2: Tensor, b2: Tensor | None, mlp: RecomputeMlp,
                g1: Tensor | None, p1_: Tensor | None, g2: Tensor | None, p2_: Tensor | None,
                given2: bool, n1: int, core1: Tensor | None, *rest: Tensor) -> tuple[Tensor, ...]:
        p1 = LinearParams(w1, L1, R1, b1)
        p2 = LinearParams(w2, L2, R2, b2)
        factors1 = rest[:n1]
        h, u = linear_forward(x, p1)
        with torch.autocast(x.device.type, enabled=False):
            a = _activation_(mlp.act, h)
        del h
        if given2:
            core2, factors2 = (rest[n1], list(rest[n1 + 1:])) if len(rest) > n1 else (None, [])
        else:
            core2, factors2 = mlp.fc2._tucker(a)
        y, _ = linear_forward(a, p2)
        first = [x] if core1 is None else [core1, *factors1]
        second = [] if core2 is None else [core2, *factors2]
        ctx.save_for_backward(*first, u, *second)
        ctx.layout = (core1 is not None, len(first), core2 is not None)
        ctx.mlp, ctx.params = mlp, (p1, p2)
        out = [] if given2 or core2 is None else [core2, *factors2]
        ctx.mark_non_differentiable(*out)
        return (y, *out)

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_: Tensor | None) -> tuple[Tensor | None, ...]:
        tucker1, n1, tucker2 = ctx.layout
        p1, p2 = ctx.params
        saved = ctx.saved_tensors
        first, u, second = saved[:n1], saved[n1], saved[n1 + 1:]
        need = ctx.needs_input_grad
        factored1, factored2 = need[10] or need[11], need[12] or need[13]
        need_dh = need[0] or need[1] or need[4] or factored1
        need_w2 = need[5] or factored2
        grads: list[Tensor | None] = [None] * len(ctx.needs_input_grad)
        with torch.autocast(dy.device.type, enabled=False):
            if need[8]:
                assert p2.bias is not None
                grads[8] = bias_grad(dy, p2.bias)
            h = None
            if need_dh or (need_w2 and not tucker2):  # recompute h = u L₁ᵀ + b₁ (and a = act(h) for WSI's fc2)
                assert p1.L is not None
                h = F.linear(u, p1.L.to(u.dtype), None if p1.bias is None else p1.bias.to(u.dtype))
            if tucker2:
                grads[5], grads[12], grads[13] = weight_grad(dy, p2, need[5], factored2, core=second[0],
                                                             factors=second[1:])
            elif need_w2:
                a = ctx.mlp.act.forward(h)  # .forward, not __call__: the module's hooks ran in the forward pass
                grads[5], grads[12], grads[13] = weight_grad(dy, p2, need[5], factored2, x=a)
                del a
            if need_dh:
                assert h is not None
                dh = _activation_backward(ctx.mlp.act, input_grad(dy, p2), h)
                del h
                if need[0]:
                    grads[0] = input_grad(dh, p1)
                if need[4]:
                    assert p1.bias is not None
                    grads[4] = bias_grad(dh, p1.bias)
                if tucker1:
                    grads[1], grads[10], grads[11] = weight_grad(dh, p1, need[1], factored1, core=first[0],
                                                                 factors=first[1:])
                else:
                    grads[1], grads[10], grads[11] = weight_grad(dh, p1, need[1], factored1, x=first[0])
        return tuple(grads)


def _activation_(act: nn.Module, h: Tensor) -> Tensor:
    """act(h) for h: (…, H), a temporary of the caller's: GELU writes over h (one (…, H) tensor at a time)."""
    if type(act) is nn.GELU:
        return torch.ops.aten.gelu.out(h, approximate=act.approximate, out=h)
    return act(h)


def _activation_backward(act: nn.Module, da: Tensor, h: Tensor) -> Tensor:
    """dh = act'(h) ⊙ da for an elementwise activation; h, da, dh: (…, H). GELU by its backward kernel, which
    needs h alone (so act(h) is never held) and writes dh over da (a temporary of the caller's), so the
    backward peak holds two (…, H) tensors, not four; any other activation through autograd."""
    if type(act) is nn.GELU:
        return torch.ops.aten.gelu_backward.grad_input(da, h, approximate=act.approximate, grad_input=da)
    with torch.enable_grad():
        h = h.detach().requires_grad_()
        (dh,) = torch.autograd.grad(act.forward(h), h, da)
    return dh
