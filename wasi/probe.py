"""One look at a model on a calibration batch: which targets run, what each receives and what each compresses.

A target's compressed input is what it receives: tokens (B, N, C), a channels-last map (B, H, W, C), (N, C) rows, …,
except that an MLP linear receiving (B, H·W, ·) inside a block fed a channels-last map (B, H, W, C) whose C is the
MLP's input width (Swin) compresses its input as that map, (B, H, W, ·) (`compression_views`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from wasi.blocks import enclosing, find_blocks, first_tensor, grid_view
from wasi.subspace import truncated_hosvd
from wasi.targets import Mlp, find_mlps

__all__ = ["Seen", "compression_views", "logits_of", "observe", "run_model"]

Inputs = Tensor | Mapping[str, Any]


def run_model(model: nn.Module, inputs: Inputs) -> Any:
    """model(inputs) for a tensor, model(**inputs) for a mapping (Hugging Face `input_ids`, `attention_mask`, …)."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def logits_of(output: Any) -> Tensor:
    """The logits of a model output: a tensor, a Hugging Face output's `.logits`, or a tuple's first item."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def _in_features(layer: nn.Module) -> int | None:
    """Input width of a linear layer (nn.Linear, Conv1D, subspace layers)."""
    width = getattr(layer, "in_features", None) or getattr(layer, "nx", None)
    return None if width is None else int(width)


@dataclass
class Seen:
    """What one target received on the calibration batch (its first call): `shape`; `view`, the shape it compresses
    (its block's (B, H, W, C) when `grid`); `calls`, how often it ran (0: never, its parent bypasses it)."""

    shape: tuple[int, ...] = ()
    view: tuple[int, ...] = ()
    grid: bool = False
    calls: int = 0


@contextmanager
def compression_views(model: nn.Module, names: Sequence[str]) -> Iterator[Callable[[str, Tensor], Tensor]]:
    """While active, `view(name, x)` is what the converted layer `name` would compress for its input x (module doc).
    For hooks on the plain (not yet converted) linears of calibration passes; removes its hooks on exit."""
    blocks = find_blocks(model)
    width = {n: _in_features(model.get_submodule(mlp.linears[0])) for mlp in find_mlps(model, blocks)
             for n in mlp.linears}
    owner = {n: b for n in names if n in width and (b := enclosing(blocks, n)) is not None}
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(block: str) -> Callable[[nn.Module, tuple, dict], None]:
        def fn(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = first_tensor(args, kwargs)
            shapes[block] = () if x is None else tuple(x.shape)
        return fn

    handles = [model.get_submodule(b).register_forward_pre_hook(hook(b), with_kwargs=True)
               for b in sorted(set(owner.values()))]

    def view(name: str, x: Tensor) -> Tensor:
        block = shapes.get(owner.get(name, ""), ())
        if len(block) == 4 and block[3] == width.get(name) and x.dim() == 3 and x.shape[0] == block[0] \
                and x.shape[1] == block[1] * block[2]:
            return grid_view(x, (block[1], block[2]))
        return x

    try:
        yield view
    finally:
        for h in handles:
            h.remove()


def observe(model: nn.Module, names: Sequence[str], inputs: Inputs, epsilon: float | None = None,
            mlps: Sequence[Mlp] = ()) -> tuple[dict[str, Seen], dict[str, list[int]], dict[str, bool]]:
    """One forward of `model` on `inputs` in eval mode without grad (modes restored, no hooks left behind).

    Returns, per target of `names`, what it received (`Seen`); with `epsilon`, per target that ran, the
    truncated-HOSVD ranks (explained variance epsilon per mode) of what it compresses; and per MLP of `mlps`,
    whether its module's output equals what its form computes with the same submodules (`MlpForm.reference`).
    """
    seen = {n: Seen() for n in names}
    ranks: dict[str, list[int]] = {}
    computes: dict[str, bool] = {}
    checking = [False]  # True while an MLP's form is recomputed: its layers' calls are not counted

    def target_hook(name: str, view: Callable[[str, Tensor], Tensor]) -> Callable[[nn.Module, tuple, Any], None]:
        def fn(module: nn.Module, args: tuple, output: Any) -> None:
            if checking[0]:
                return
            record = seen[name]
            record.calls += 1
            if record.calls > 1:
                return
            x = args[0].detach()
            xv = view(name, x)
            record.shape, record.view, record.grid = tuple(x.shape), tuple(xv.shape), xv.dim() != x.dim()
            if epsilon is not None:
                ranks[name] = [u.shape[1] for u in truncated_hosvd(xv, epsilon)[1]]
        return fn

    def mlp_hook(mlp: Mlp) -> Callable[[nn.Module, tuple, Any], None]:
        def fn(module: nn.Module, args: tuple, output: Any) -> None:
            if mlp.name in computes or not args or not isinstance(output, Tensor):
                computes.setdefault(mlp.name, False)
                return
            checking[0] = True
            try:
                expected = mlp.form.reference(module, args[0])
            except (RuntimeError, TypeError, ValueError):
                expected = None
            finally:
                checking[0] = False
            tol = 1e-5 * (1.0 + float(output.abs().max())) if output.numel() else 0.0
            computes[mlp.name] = expected is not None and expected.shape == output.shape and bool(
                torch.allclose(expected, output, rtol=1e-4, atol=tol))
        return fn

    modes = {m: m.training for m in model.modules()}
    with compression_views(model, names) as view:
        handles = [model.get_submodule(n).register_forward_hook(target_hook(n, view)) for n in names]
        handles += [model.get_submodule(m.name).register_forward_hook(mlp_hook(m)) for m in mlps]
        try:
            model.eval()
            with torch.no_grad():
                run_model(model, inputs)
        finally:
            for h in handles:
                h.remove()
            for m, training in modes.items():
                m.train(training)
    return seen, ranks, computes
