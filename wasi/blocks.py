"""Transformer blocks, found from a model's structure, and the channels-last maps some of them take.

A block is an item of a stack: an `nn.ModuleList` or `nn.Sequential` whose items are all of one type and each
hold a linear layer (timm `blocks.<i>`, Swin `layers.<s>.blocks.<i>`, multi-stage `stages.<s>.blocks.<i>`,
Hugging Face `encoder.layer.<i>`, GPT-2 `h.<i>`, Llama `model.layers.<i>`, under any prefix), taking the outermost
stacks. An item with a stack among its direct children is a stage, and that stack's items are the blocks (Swin's
`layers.<s>` holds `blocks`); a stack deeper inside an item (a layer split into a Sequential of factors, a mixture
of experts) leaves the item a block. An item that is itself a bare `nn.Sequential`/`nn.ModuleList` (DaViT's pairs
of blocks) gives its children.

A block's attention is the module inside it named one of ATTENTION_MODULES (timm `attn`, Hugging Face ViT, Dinov2
and BERT `attention`, GPT-2 `attn`, Llama `self_attn`), at the smallest depth one has (`attention_of`).

A Swin block takes a channels-last map (B, H, W, C) but runs its MLP on the (B, H·W, C) reshape; such MLP inputs
are compressed over four modes, (B, H, W, C) (a free view), as in docs/method.md, Activation subspace (ASI). The
block tells those layers (H, W) from a forward pre-hook (`wasi.layers.track_token_grid`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from wasi.adapters import is_linear_like

__all__ = ["ATTENTION_MODULES", "attention_of", "block_grid", "enclosing", "find_blocks", "first_tensor",
           "grid_view"]

_STACKS = (nn.ModuleList, nn.Sequential)

#: The names a transformer block gives its attention module, whose forward maps the (normalised) block input to the
#: attention branch: timm ViT and relatives, Swin (`WindowAttention`), GPT-2 (`attn`); Hugging Face ViT, Dinov2,
#: BERT (`attention`, holding the self-attention and its output projection); the Llama family and most decoders
#: (`self_attn`); Falcon, Bloom (`self_attention`). The attention linears of wasi.targets.ATTENTION_LINEARS lie in them.
ATTENTION_MODULES: tuple[str, ...] = ("attn", "attention", "self_attn", "self_attention")


def find_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the transformer blocks of `model` in registration order (module doc: what counts)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    holds: dict[str, bool] = {}
    for name in reversed(list(modules)):  # children before parents
        module = modules[name]
        prefix = f"{name}." if name else ""
        holds[name] = is_linear_like(module) or any(holds.get(prefix + c, False) for c, _ in module.named_children())

    def join(parent: str, child: str) -> str:
        return f"{parent}.{child}" if parent else child

    def is_stack(name: str) -> bool:
        """A stack of blocks: same-type items, each holding a linear layer without being one."""
        module = modules[name]
        items = list(module.named_children())
        return isinstance(module, _STACKS) and bool(items) and len({type(m) for _, m in items}) == 1 and all(
            holds[join(name, c)] and not is_linear_like(m) for c, m in items)

    def blocks_of(stack: str) -> list[str]:
        found = []
        for child, module in modules[stack].named_children():
            item = join(stack, child)
            inner = [join(item, c) for c, _ in module.named_children() if is_stack(join(item, c))]
            if inner:  # a stage: its stacks of blocks are direct children (Swin `layers.<s>.blocks`)
                found += [b for s in inner for b in blocks_of(s)]
            elif type(module) in _STACKS:  # a bare container of blocks (DaViT's pairs)
                found += [join(item, c) for c, m in module.named_children() if holds[join(item, c)]]
            else:
                found.append(item)
        return found

    stacks = [n for n in modules if is_stack(n)]
    roots = [n for n in stacks if not any(n.startswith(o + ".") for o in stacks if o != n)]
    return [b for root in roots for b in blocks_of(root)]


def attention_of(block: nn.Module) -> list[str]:
    """Names, within `block`, of its attention modules: the submodules named one of ATTENTION_MODULES that are not
    linear layers, at the smallest depth any has (so HF ViT's `attention`, not the `attention.attention` inside it;
    both of MaxViT's `attn_block.attn` and `attn_grid.attn`); [] when the block has none."""
    found = [(rel.count("."), rel) for rel, m in block.named_modules()
             if rel and rel.rpartition(".")[2] in ATTENTION_MODULES and not is_linear_like(m)]
    depth = min((d for d, _ in found), default=0)
    return [rel for d, rel in found if d == depth]


def enclosing(blocks: Sequence[str], name: str) -> str | None:
    """The block among `blocks` that holds module `name`, else None."""
    return next((b for b in blocks if name == b or name.startswith(b + ".")), None)


def first_tensor(args: tuple, kwargs: Mapping[str, Any] | None = None) -> Tensor | None:
    """A module call's main input: its first positional tensor, else the first tensor keyword (`hidden_states`)."""
    for value in (*args, *(kwargs or {}).values()):
        if isinstance(value, Tensor):
            return value
    return None


def grid_view(x: Tensor, grid: tuple[int, int] | None) -> Tensor:
    """x: (B, H·W, C) -> (B, H, W, C) for grid (H, W) (a free view of a contiguous x); x itself for None."""
    if grid is None:
        return x
    h, w = grid
    if x.dim() != 3 or x.shape[1] != h * w:
        raise ValueError(f"expected a (B, H·W, C) = (B, {h * w}, C) input for the block's (H, W) = {grid} map, "
                         f"got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], h, w, x.shape[2])


def block_grid(block_input: Tensor | None) -> tuple[int, int] | None:
    """(H, W) of a channels-last block input (B, H, W, C); None for tokens (B, N, C) or anything else."""
    if block_input is None or block_input.dim() != 4:
        return None
    return int(block_input.shape[1]), int(block_input.shape[2])
