"""MLP forms and their fused low-rank recompute: MLPs whose WSI/WASI linears save nothing of the hidden width.

An MLP form says where an MLP's linears sit inside the module that holds them and how they combine:
  PlainMlp   y = fc2(act(fc1 x))                          timm Mlp, Hugging Face ViTMLP/Dinov2MLP, GPT-2 (Conv1D)
  GluMlp     h = fc1 x (…, 2H), y = fc2(act(h₁) ⊙ h₂)     timm GluMlp (EVA-02; `gate_last` swaps the halves)
  GatedMlp   y = down(act(gate x) ⊙ up x)                 timm SwiGLU, Hugging Face Llama family, Dinov2 SwiGLU
  UnfusedMlp found by its linears alone, not fused        Hugging Face BERT (intermediate.dense, output.dense),
                                                          PVT v2 (a depthwise convolution between fc1 and fc2)
`MLP_FORMS` is the one table of them; `wasi.targets` finds MLPs with it, `inject` fuses them with it.

Fused (recompute="mlp"): each input projection computes u = x Rᵀ: (…, K) on its way to h = u Lᵀ + b: (…, H).
Backward needs act'(h) (and, for WSI, the output projection's dense input a); both are recomputed from the u's,
so the MLP saves (…, K) per input projection instead of (…, H) (docs/method.md, Whole-step recompute). Extra cost:
one (…, K)×(K, H) product per input projection and the activation, per step. Fusing sets the MLP module's own
`forward` (the module, its type, its submodules and state_dict keys are unchanged; `unfuse` removes it).
"""
from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wasi.adapters import is_linear_like
from wasi.functional import (
    LinearParams,
    bias_grad,
    compute_dtype,
    factor_product,
    input_grad,
    linear_forward,
    linear_forward_with,
    weight_grad,
)
from wasi.layers import WSILinear

__all__ = ["MLP_FORMS", "GatedMlp", "GluMlp", "MlpForm", "PlainMlp", "UnfusedMlp", "form_of", "fuse", "fused_form",
           "is_fused", "unfuse"]

Act = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class MlpForm(ABC):
    """Where an MLP's linears sit (paths relative to the module holding them) and how they combine.

    inputs: the input projection(s), in the order `combine` takes them; output: the output projection;
    act: the attribute holding the activation; inner: modules between the activation and the output projection
    (identity or p=0 dropout for the fused path); outer: modules after the output projection (applied outside
    the fused function, dropout included); label: the families it describes, for messages.
    """

    inputs: tuple[str, ...]
    output: str
    act: str
    inner: tuple[str, ...] = ()
    outer: tuple[str, ...] = ()
    label: str = ""
    fusable: ClassVar[bool] = True

    @property
    def linears(self) -> tuple[str, ...]:
        return (*self.inputs, self.output)

    def matches(self, module: nn.Module) -> bool:
        """`module` has every linear of this form (linear layers), its activation and its inner/outer modules."""
        subs = dict(module.named_modules())
        return (all(p in subs and is_linear_like(subs[p]) for p in self.linears)
                and all(n in subs for n in (*self.inner, *self.outer)) and hasattr(module, self.act))

    @abstractmethod
    def formula(self) -> str:
        """What the form computes, e.g. "fc2(act(fc1(x)))"."""

    @abstractmethod
    def combine(self, module: nn.Module, hs: list[Tensor], inplace: bool = False) -> Tensor:
        """The hidden activation a: (…, H) from the input projections' outputs hs (inplace: may write over them)."""

    @abstractmethod
    def combine_backward(self, module: nn.Module, da: Tensor, hs: list[Tensor]) -> list[Tensor]:
        """d loss / d hs from da = d loss / d a: (…, H), for the recomputed hs; may write over da."""

    def reference(self, module: nn.Module, x: Tensor) -> Tensor:
        """What the form computes with `module`'s own submodules: x: (…, I) -> (…, O)."""
        a = self.combine(module, [module.get_submodule(p)(x) for p in self.inputs])
        for name in self.inner:
            a = module.get_submodule(name)(a)
        y = module.get_submodule(self.output)(a)
        for name in self.outer:
            y = module.get_submodule(name)(y)
        return y

    def problem(self, module: nn.Module) -> str | None:
        """Why the fused path cannot take `module` (whatever its linears are), or None."""
        for name in self.inner:
            inner = module.get_submodule(name)
            if isinstance(inner, nn.Dropout) and inner.p > 0:
                return f"the fused path does not replay dropout between the layers ({name}: {inner})"
            if not isinstance(inner, (nn.Identity, nn.Dropout)):
                return f"the fused path does not recompute a hidden norm between the layers ({name}: {inner})"
        return None


@dataclass(frozen=True)
class PlainMlp(MlpForm):
    """y = output(act(input x))."""

    def formula(self) -> str:
        return f"{self.output}({self.act}({self.inputs[0]}(x)))"

    def combine(self, module: nn.Module, hs: list[Tensor], inplace: bool = False) -> Tensor:
        return _activation(getattr(module, self.act), hs[0], inplace)

    def combine_backward(self, module: nn.Module, da: Tensor, hs: list[Tensor]) -> list[Tensor]:
        return [_activation_backward(getattr(module, self.act), da, hs[0])]


@dataclass(frozen=True)
class GatedMlp(MlpForm):
    """y = output(act(gate x) ⊙ up x), inputs = (gate, up)."""

    def formula(self) -> str:
        gate, up = self.inputs
        return f"{self.output}({self.act}({gate}(x)) * {up}(x))"

    def combine(self, module: nn.Module, hs: list[Tensor], inplace: bool = False) -> Tensor:
        g, v = hs
        s = _activation(getattr(module, self.act), g, inplace)
        return s.mul_(v) if inplace else s * v

    def combine_backward(self, module: nn.Module, da: Tensor, hs: list[Tensor]) -> list[Tensor]:
        g, v = hs
        return list(_gate_backward(getattr(module, self.act), da, g, v))


@dataclass(frozen=True)
class GluMlp(MlpForm):
    """One input projection of width 2H whose halves h₁, h₂ gate each other: a = act(h₁) ⊙ h₂, or h₁ ⊙ act(h₂)
    when the module's `gate_last` is true (timm GluMlp), chunked along the last dimension."""

    def matches(self, module: nn.Module) -> bool:
        return super().matches(module) and hasattr(module, "chunk_dim")

    def formula(self) -> str:
        return f"{self.output}(act(h1) * h2), (h1, h2) = {self.inputs[0]}(x).chunk(2)"

    def _halves(self, module: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
        """(gate half, other half) of h: (…, 2H)."""
        first, second = h.chunk(2, dim=-1)
        return (second, first) if getattr(module, "gate_last", False) else (first, second)

    def combine(self, module: nn.Module, hs: list[Tensor], inplace: bool = False) -> Tensor:
        g, v = self._halves(module, hs[0])
        return _activation(getattr(module, self.act), g) * v  # g is a view of h: never written over

    def combine_backward(self, module: nn.Module, da: Tensor, hs: list[Tensor]) -> list[Tensor]:
        g, v = self._halves(module, hs[0])
        dg, dv = _gate_backward(getattr(module, self.act), da, g, v)
        return [torch.cat([dv, dg] if getattr(module, "gate_last", False) else [dg, dv], dim=-1)]

    def problem(self, module: nn.Module) -> str | None:
        if getattr(module, "chunk_dim", -1) != -1:
            return f"it chunks the hidden features along dim {module.chunk_dim}, not the last one"
        return super().problem(module)


@dataclass(frozen=True)
class UnfusedMlp(MlpForm):
    """An MLP the fused path does not take, found by its linears alone so that the "mlp" target preset converts
    them: `why` says what lies between them (a depthwise convolution, two modules, …)."""

    why: str = ""
    fusable: ClassVar[bool] = False

    def matches(self, module: nn.Module) -> bool:
        subs = dict(module.named_modules())
        return all(p in subs and is_linear_like(subs[p]) for p in self.linears)

    def formula(self) -> str:
        return f"{self.inputs[0]} -> … -> {self.output}"

    def combine(self, module: nn.Module, hs: list[Tensor], inplace: bool = False) -> Tensor:
        raise ValueError(f"{type(self).__name__} has no fused path")

    def combine_backward(self, module: nn.Module, da: Tensor, hs: list[Tensor]) -> list[Tensor]:
        raise ValueError(f"{type(self).__name__} has no fused path")

    def problem(self, module: nn.Module) -> str | None:
        return self.why


#: Every MLP form the library knows, most specific first (one MLP module takes the first form it matches).
MLP_FORMS: tuple[MlpForm, ...] = (
    GluMlp(("fc1",), "fc2", "act", inner=("drop1", "norm"), outer=("drop2",), label="timm GluMlp (EVA-02)"),
    PlainMlp(("fc1",), "fc2", "act", inner=("drop1", "norm"), outer=("drop2",), label="timm Mlp"),
    GatedMlp(("fc1_g", "fc1_x"), "fc2", "act", inner=("drop1", "norm"), outer=("drop2",), label="timm SwiGLU"),
    PlainMlp(("fc1",), "fc2", "activation_fn", label="Hugging Face ViT/Dinov2/CLIP MLP"),
    PlainMlp(("c_fc",), "c_proj", "act", outer=("dropout",), label="Hugging Face GPT-2 MLP"),
    GatedMlp(("gate_proj", "up_proj"), "down_proj", "act_fn", label="Hugging Face Llama-family MLP"),
    UnfusedMlp(("intermediate.dense",), "output.dense", "", label="Hugging Face BERT MLP",
               why="its linears lie in two modules, with the second one's dropout, residual and norm after them"),
    UnfusedMlp(("fc1",), "fc2", "", label="an MLP with other layers between fc1 and fc2 (PVT v2)",
               why="it has other layers between fc1 and fc2 (as PVT v2's depthwise convolution)"),
)


def form_of(module: nn.Module) -> MlpForm | None:
    """The first form of MLP_FORMS that `module` matches, else None."""
    return next((f for f in MLP_FORMS if f.matches(module)), None)


# --- fusing ---------------------------------------------------------------------------------------------------------

def fuse(module: nn.Module, form: MlpForm) -> None:
    """Make `module`, an MLP of `form` whose linears are WSI/WASI layers, run the fused recompute in training.
    ValueError naming the fix when it cannot (dropout or a norm between its layers, unconverted linears)."""
    problem = form.problem(module)
    unconverted = [p for p in form.linears if not isinstance(module.get_submodule(p), WSILinear)]
    if problem is None and unconverted:
        problem = f"it recomputes from the low-rank x Rᵀ, which {unconverted} (not WSI/WASI layers) do not have"
    if problem is not None:
        raise ValueError(f"recompute='mlp' cannot fuse {type(module).__name__}: {problem}; set recompute='none' "
                         "or 'block'")
    module.forward = functools.partial(_fused_forward, form, module)


def fused_form(module: nn.Module) -> MlpForm | None:
    """The form `module` is fused with (`fuse`), else None."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, functools.partial) and forward.func is _fused_forward:
        return forward.args[0]
    return None


def is_fused(module: nn.Module) -> bool:
    return fused_form(module) is not None


def unfuse(module: nn.Module) -> None:
    """Undo `fuse`: the module runs its own forward again."""
    if is_fused(module):
        del module.__dict__["forward"]


def _fused_forward(form: MlpForm, module: nn.Module, x: Tensor) -> Tensor:
    """x: (…, I) -> (…, O). Eval mode or no grad: the module's own forward.

    The side effects stay out of the autograd Function (so torch.compile traces it as one graph): the input
    projections compress x here, and the output projection's Tucker factors of the hidden a, which only the
    Function sees, come back as its extra outputs and are kept here. Inside a checkpointed block's recomputation
    the output projection's recorded compression is passed in instead (`_replayed`)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))
    if not (module.training and needs_grad):
        return type(module).forward(module, x)
    layers: list[WSILinear] = [module.get_submodule(p) for p in form.linears]  # type: ignore[misc]
    *inputs, output = layers
    for layer in layers:
        layer.note_batch(x)
    x = x.to(compute_dtype(x))
    hidden = (*x.shape[:-1], output.in_features)
    params = [t for layer, shape in zip(layers, [x.shape] * len(inputs) + [hidden])
              for t in (*layer._fn_weights(), layer.bias, *layer._carriers(shape, x))]
    kept: list[Tensor] = []
    counts: list[int] = []
    for layer in inputs:
        core, factors = layer._compress(x)
        compressed = [] if core is None else [core, *factors]
        kept += compressed
        counts.append(len(compressed))
    replayed = output._replayed()
    if replayed is not None:
        compressed = [] if replayed[0] is None else [replayed[0], *replayed[1]]
        kept += compressed
        counts.append(len(compressed))
    y, *out = _FusedMlpFn.apply(x, _Plan(form, module, layers), tuple(counts), *params, *kept)
    if replayed is None:  # the output projection's Tucker step ran inside the Function, which returned it
        output._remember(math.prod(hidden) * x.element_size(), out[0] if out else None, out[1:])
    for name in form.outer:
        y = module.get_submodule(name)(y)
    return y


@dataclass
class _Plan:
    """What one fused call needs besides the tensors: the form, the MLP module, its layers (inputs, then output)."""

    form: MlpForm
    module: nn.Module
    layers: list[WSILinear]


_PER_LAYER = 6  # (weight, L, R, bias, G carrier, P carrier) of each layer among _FusedMlpFn's inputs
_FIRST = 3  # x, the plan and the counts come before them


class _FusedMlpFn(torch.autograd.Function):
    """The fused MLP. Inputs: x, the plan, `counts`, then (weight, L, R, bias, G carrier, P carrier) of each input
    projection and of the output (carriers: wasi.functional.factored_carriers, or None when the layer takes no
    factored ∇W), then each input projection's compression of x (counts[j] tensors: Tucker S, U_m, or none when
    x is saved dense) and, when counts has one entry more, the output projection's recorded compression of a (a
    recomputation replaying it). Outputs: y, then the output projection's S, U_m of a when its Tucker step ran
    here (non-differentiable, for the caller to keep: no side effect in the Function).

    Saved for backward: each input projection's input as that layer saves it (Tucker S, U_m of x for WASI; x for
    WSI), its u = x Rᵀ (…, K), and for WASI the output projection's Tucker S, U_m of a; nothing of size (…, H).
    Backward: da = (dy L_o) R_o; h = u Lᵀ + b recomputed per input projection (and a for WSI's output weight
    gradient); dh from the form's `combine_backward`; the input projections' ∇W from their saved inputs,
    dx = Σ (dh L) R; biases Σ dy, Σ dh. ∇W goes to each layer's dense weight grad or, factored, to its carriers as
    (Gᵀ, Pᵀ). The gradients are those of the plain MLP with the same layers.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, plan: _Plan, counts: tuple[int, ...], *rest: Tensor | None) -> tuple[Tensor, ...]:
        n = len(plan.layers) - 1
        ps = [LinearParams(*rest[_PER_LAYER * j: _PER_LAYER * j + 4]) for j in range(n + 1)]
        given = cast(list[Tensor], list(rest[_PER_LAYER * (n + 1):]))  # the compressions: never None
        saved: list[Tensor] = []
        layout: list[tuple[bool, int]] = []
        hs = []
        for count, p in zip(counts[:n], ps):
            compressed, given = given[:count], given[count:]
            h, u = linear_forward(x, p)
            assert u is not None  # WSI/WASI layers are low rank
            kept = compressed or [x]
            saved += [*kept, u]
            layout.append((bool(compressed), len(kept)))
            hs.append(h)
        with torch.autocast(x.device.type, enabled=False):
            a = plan.form.combine(plan.module, hs, inplace=True)
        del hs
        core_o: Tensor | None
        # a U^prev of the output projection's Tucker step (feature mode), taken in the product that reads a anyway;
        # not in bf16/fp16, where the wider product rounds differently from the layer's own (recompute=none) run
        exact = a.dtype in (torch.float32, torch.float64)
        warm = plan.layers[n].feature_warm_start(a.shape) if exact and len(counts) == n else None
        last = None
        if warm is None:
            y, _ = linear_forward(a, ps[-1])
        else:
            y, last = linear_forward_with(a, ps[-1], warm.T)
        if len(counts) > n:
            core_o, factors_o = (given[0], given[1:]) if given else (None, [])
            out: list[Tensor] = []
        else:
            core_o, factors_o = plan.layers[n]._tucker(a, last)
            out = [] if core_o is None else [core_o, *factors_o]
        if core_o is not None:
            saved += [core_o, *factors_o]
        ctx.save_for_backward(*saved)
        ctx.layout, ctx.tucker_out, ctx.plan, ctx.ps = layout, core_o is not None, plan, ps
        ctx.mark_non_differentiable(*out)
        return (y, *out)

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_: Tensor | None) -> tuple[Tensor | None, ...]:
        plan, ps = ctx.plan, ctx.ps
        n = len(ps) - 1
        need = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * len(need)

        def at(j: int, k: int) -> int:  # the input index of layer j's k-th tensor (weight, L, R, bias, G, P)
            return _FIRST + _PER_LAYER * j + k

        def wants(j: int) -> tuple[bool, bool, bool]:  # (dense weight grad, factored grad, bias grad) of layer j
            return need[at(j, 0)], need[at(j, 4)] or need[at(j, 5)], need[at(j, 3)]

        def put(j: int, dw: tuple[Tensor | None, Tensor | None, Tensor | None]) -> None:
            grads[at(j, 0)], grads[at(j, 4)], grads[at(j, 5)] = dw

        saved, firsts, pos = ctx.saved_tensors, [], 0
        for _, size in ctx.layout:
            firsts.append((saved[pos: pos + size], saved[pos + size]))
            pos += size + 1
        out_factors = saved[pos:]
        dense_o, factored_o, bias_o = wants(n)
        need_dh = need[0] or any(any(wants(j)) for j in range(n))
        with torch.autocast(dy.device.type, enabled=False):
            if bias_o:
                grads[at(n, 3)] = bias_grad(dy, _bias(ps[n]))
            hs: list[Tensor] = []
            if need_dh or ((dense_o or factored_o) and not ctx.tucker_out):
                for (_, u), p in zip(firsts, ps):
                    assert p.L is not None
                    hs.append(factor_product(u, p.L.to(u.dtype), None if p.bias is None else p.bias.to(u.dtype)))
            if ctx.tucker_out:
                put(n, weight_grad(dy, ps[n], dense_o, factored_o, core=out_factors[0], factors=out_factors[1:]))
            elif dense_o or factored_o:
                a = plan.form.combine(plan.module, hs)  # WSI: the output projection's dense input, recomputed
                put(n, weight_grad(dy, ps[n], dense_o, factored_o, x=a))
                del a
            if need_dh:
                dhs = plan.form.combine_backward(plan.module, input_grad(dy, ps[n]), hs)
                del hs
                for j, ((tucker, _), (kept, _), dh, p) in enumerate(zip(ctx.layout, firsts, dhs, ps)):
                    if need[0]:
                        dx = input_grad(dh, p)
                        grads[0] = dx if grads[0] is None else grads[0].add_(dx)
                    dense, factored, bias = wants(j)
                    if bias:
                        grads[at(j, 3)] = bias_grad(dh, _bias(p))
                    if tucker:
                        put(j, weight_grad(dh, p, dense, factored, core=kept[0], factors=kept[1:]))
                    else:
                        put(j, weight_grad(dh, p, dense, factored, x=kept[0]))
        return tuple(grads)


def _bias(p: LinearParams) -> Tensor:
    assert p.bias is not None
    return p.bias


# --- activations ----------------------------------------------------------------------------------------------------

def _activation(act: Act, h: Tensor, inplace: bool = False) -> Tensor:
    """act(h) for h: (…, H). inplace: GELU and SiLU write over h, a temporary of the caller's (one (…, H) at a time)."""
    if inplace and type(act) is nn.GELU:
        return torch.ops.aten.gelu.out(h, approximate=act.approximate, out=h)
    if inplace and type(act) is nn.SiLU:
        return F.silu(h, inplace=True)
    return act.forward(h) if isinstance(act, nn.Module) else act(h)  # .forward: the module's hooks ran in forward


def _activation_backward(act: Act, da: Tensor, h: Tensor) -> Tensor:
    """dh = act'(h) ⊙ da for an elementwise activation; h, da, dh: (…, H). GELU and SiLU by their backward kernels,
    which need h alone (so act(h) is never held) and write dh over da (a temporary of the caller's); any other
    activation (Hugging Face's activation modules, a plain function) by its vector-Jacobian product
    (`torch.func.vjp`, which torch.compile traces inside a backward, where `torch.autograd.grad` breaks the graph)."""
    if type(act) is nn.GELU:
        return torch.ops.aten.gelu_backward.grad_input(da, h, approximate=act.approximate, grad_input=da)
    if type(act) is nn.SiLU:
        return torch.ops.aten.silu_backward.grad_input(da, h, grad_input=da)
    vjp = torch.func.vjp(lambda t: _activation(act, t), h)[1]  # (act(h), its vector-Jacobian product)
    (dh,) = vjp(da)
    return dh


def _gate_backward(act: Act, da: Tensor, g: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(dg, dv) of a = act(g) ⊙ v for da: (…, H); writes over da."""
    dv = da * _activation(act, g)
    return _activation_backward(act, da.mul_(v), g), dv

