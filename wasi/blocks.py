"""Transformer blocks of timm ViT and Swin: where they are, and the token layout their MLPs compress.

timm names blocks `blocks.<i>` (ViT) and `layers.<s>.blocks.<i>` (Swin). A Swin block takes a channels-last
map (B, H, W, C) but runs its MLP on the (B, H·W, C) reshape; the MLP linears' inputs are compressed over
four modes, (B, H, W, C) (a free view), as in docs/method.md, Activation subspace (ASI). The block tells its
converted MLP layers (H, W) from a forward pre-hook (wasi.layers.track_token_grid); calibration code gets the
same views from `compression_views`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

__all__ = ["attention_of", "block_grid", "block_of", "compressed_modes", "compression_views", "find_blocks",
           "grid_view"]

_BLOCK = re.compile(r"(?:^|\.)blocks\.\d+$")
_MLP_LINEAR = re.compile(r"^(?P<block>(?:.*\.)?blocks\.\d+)\.mlp\.fc[12]$")
_SWIN_MLP_LINEAR = re.compile(r"(?:^|\.)layers\.\d+\.blocks\.\d+\.mlp\.fc[12]$")


def find_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the transformer blocks in forward order: ViT `blocks.<i>`, Swin `layers.<s>.blocks.<i>`
    (any prefix allowed, e.g. a wrapper's `base_model.model.`; blocks nested in a block are not listed)."""
    names: list[str] = []
    for name, _ in model.named_modules():
        if _BLOCK.search(name) and not any(name.startswith(b + ".") for b in names):
            names.append(name)
    return names


def attention_of(block: nn.Module) -> str | None:
    """Name, within `block`, of its attention module (timm ViT `Attention`, Swin `WindowAttention`: `attn`), whose
    forward maps the (normalised) block input to the attention branch; None when the block has none."""
    return "attn" if isinstance(getattr(block, "attn", None), nn.Module) else None


def block_of(name: str) -> str | None:
    """The block holding MLP linear `name` (`<block>.mlp.fc1` / `.fc2`), else None."""
    match = _MLP_LINEAR.match(name)
    return None if match is None else match.group("block")


def compressed_modes(name: str) -> int:
    """How many modes the target linear `name` compresses its input over: 4 for a Swin MLP linear
    (`layers.<s>.blocks.<i>.mlp.fc1/fc2`: (B, H, W, C)), else 3 (ViT (B, N, C), Swin attention (B·nW, Wh·Ww, C))."""
    return 4 if _SWIN_MLP_LINEAR.search(name) else 3


def grid_view(x: Tensor, grid: tuple[int, int] | None) -> Tensor:
    """x: (B, H·W, C) -> (B, H, W, C) for grid (H, W) (a free view of a contiguous x); x itself for None."""
    if grid is None:
        return x
    h, w = grid
    if x.dim() != 3 or x.shape[1] != h * w:
        raise ValueError(f"expected a (B, H·W, C) = (B, {h * w}, C) input for the block's (H, W) = {grid} map, "
                         f"got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], h, w, x.shape[2])


def block_grid(block_input: Tensor) -> tuple[int, int] | None:
    """(H, W) of a channels-last block input (B, H, W, C); None for tokens (B, N, C)."""
    return (int(block_input.shape[1]), int(block_input.shape[2])) if block_input.dim() == 4 else None


@contextmanager
def compression_views(model: nn.Module, names: Sequence[str]) -> Iterator[Callable[[str, Tensor], Tensor]]:
    """While active, `view(name, x)` is what the converted layer `name` would compress for its input x:
    (B, H, W, C) for the MLP linears of a block fed a channels-last map (Swin), else x itself.
    For hooks on the plain (not yet converted) linears of calibration passes; removes its hooks on exit."""
    grids: dict[str, tuple[int, int] | None] = {}
    blocks = sorted({b for b in (block_of(n) for n in names) if b is not None})

    def hook(name: str) -> Callable[[nn.Module, tuple], None]:
        def fn(module: nn.Module, args: tuple) -> None:
            grids[name] = block_grid(args[0])
        return fn

    handles = [model.get_submodule(b).register_forward_pre_hook(hook(b)) for b in blocks]
    try:
        yield lambda name, x: grid_view(x, grids.get(block_of(name) or "", None))
    finally:
        for h in handles:
            h.remove()
