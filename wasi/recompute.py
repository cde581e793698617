"""Block and attention recompute: a module saves only its input and recomputes the rest in backward.

`checkpoint_blocks(model)` runs each block of a timm ViT / Swin under PyTorch's non-reentrant
`torch.utils.checkpoint.checkpoint` (docs/method.md, Whole-step recompute); `checkpoint_attention(model)` does the
same for each block's attention module only (`wasi.blocks.attention_of`). Both work for any method (dense,
PEFT LoRA, SVD-LLM factors, ASI/WSI/WASI). The recomputation of a module holding subspace layers must
not take a second subspace-iteration step: through `checkpoint`'s `context_fn`, a `TuckerRecord` per call
records each layer's Tucker factors in the forward and replays them in the recomputation, so the factors,
the warm-start state, the RNG and the gradient are those of the first forward.

What a block run saves until backward: the block input (B, N, D) (ViT) or (B, H, W, C) (Swin) for each block,
plus the recorded Tucker core and factors of its ASI/WASI layers (what those layers save anyway); nothing
else of the block (no attention q, k, v, output or log-sum-exp, no LayerNorm or GELU input). An attention run
saves the attention's input (B, N, D) (Swin: the windows (B·nW, Wh·Ww, C)) instead of q, k, v (B, heads, N, d),
the attention output and the log-sum-exp, and recomputes the q, k, v projection, the attention and its output
projection in backward: a fraction of the block's forward.
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from wasi.blocks import attention_of, find_blocks

__all__ = ["TuckerRecord", "active_record", "checkpoint_attention", "checkpoint_blocks", "is_checkpointed"]

_local = threading.local()

Compressed = tuple[Tensor | None, list[Tensor]]


class TuckerRecord:
    """The Tucker factors the subspace layers of one checkpointed call computed, for its recomputation.

    Inside `recording()` each layer's compression is stored (per layer, in call order); inside `replaying()`
    (entered afresh for every recomputation) layers take them back in the same order instead of compressing
    again. A recomputation that `checkpoint` stops early simply leaves entries unread.
    """

    def __init__(self) -> None:
        self._entries: dict[int, list[Compressed]] = {}
        self._read: dict[int, int] = {}

    @contextmanager
    def recording(self) -> Iterator[None]:
        with _active(self, replay=False):
            yield

    @contextmanager
    def replaying(self) -> Iterator[None]:
        self._read = {}
        with _active(self, replay=True):
            yield

    def contexts(self) -> tuple[Any, Any]:
        """`context_fn` for torch.utils.checkpoint: (forward context, recomputation context)."""
        return self.recording(), self.replaying()

    def put(self, layer: nn.Module, compressed: Compressed) -> None:
        self._entries.setdefault(id(layer), []).append(compressed)

    def take(self, layer: nn.Module) -> Compressed:
        i = self._read.get(id(layer), 0)
        entries = self._entries.get(id(layer), [])
        if i >= len(entries):
            raise RuntimeError(f"{type(layer).__name__} compresses more often in the recomputation than in the first "
                               "forward of its checkpointed block; did the block's training mode or inputs change?")
        self._read[id(layer)] = i + 1
        return entries[i]


@contextmanager
def _active(record: TuckerRecord, replay: bool) -> Iterator[None]:
    previous = getattr(_local, "state", None)
    _local.state = (record, replay)
    try:
        yield
    finally:
        _local.state = previous


def active_record() -> tuple[TuckerRecord, bool] | None:
    """(record, replaying) of the checkpointed call running in this thread, or None outside one."""
    return getattr(_local, "state", None)


def _checkpointed_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(module).forward
    if not (module.training and torch.is_grad_enabled()) or torch.jit.is_tracing() or torch.jit.is_scripting():
        return forward(module, *args, **kwargs)
    if not any(getattr(m, "act_ranks", None) is not None for m in module.modules()):
        # no Tucker-compressing layer inside: nothing to record, and torch.compile traces the plain checkpoint
        return checkpoint(forward, module, *args, use_reentrant=False, **kwargs)
    record = TuckerRecord()
    return checkpoint(forward, module, *args, use_reentrant=False,
                      context_fn=functools.partial(TuckerRecord.contexts, record), **kwargs)


def _checkpoint(module: nn.Module) -> None:
    """Wrap `module`'s own forward (in place, idempotent) so that in training it recomputes in backward."""
    if not is_checkpointed(module):
        module.forward = functools.partial(_checkpointed_forward, module)


def is_checkpointed(module: nn.Module) -> bool:
    """True when `checkpoint_blocks` or `checkpoint_attention` has made `module` recompute in backward."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _checkpointed_forward


def checkpoint_blocks(model: nn.Module) -> list[str]:
    """Make every transformer block of `model` (timm ViT `blocks.<i>`, Swin `layers.<s>.blocks.<i>`) save only
    its input in training and recompute the rest in backward; returns the block names.

    In place and idempotent. Module names, state_dict keys and parameters are unchanged (the block's own
    `forward` is wrapped); in eval mode, without grad, or under TorchScript tracing the blocks run as before.
    Exact: gradients equal the un-checkpointed ones (dropout/drop-path RNG is replayed by checkpoint, Tucker
    factors by `TuckerRecord`).
    """
    names = find_blocks(model)
    if not names:
        raise ValueError(f"no transformer blocks found in {type(model).__name__}: expected timm ViT 'blocks.<i>' or "
                         "Swin 'layers.<s>.blocks.<i>' modules")
    for name in names:
        _checkpoint(model.get_submodule(name))
    return names


def checkpoint_attention(model: nn.Module) -> list[str]:
    """Make the attention module of every transformer block of `model` (`wasi.blocks.attention_of`: timm ViT and Swin
    `<block>.attn`) save only its input in training and recompute q, k, v, the attention and its output projection
    in backward; returns the attention modules' names. Nothing of size (B, heads, N, d) is held from forward to
    backward. In place and idempotent, exact, as `checkpoint_blocks` (module names and state_dict unchanged)."""
    names = []
    for block_name in find_blocks(model):
        block = model.get_submodule(block_name)
        child = attention_of(block)
        if child is not None:
            _checkpoint(block.get_submodule(child))
            names.append(f"{block_name}.{child}")
    if not names:
        raise ValueError(f"no attention modules found in the transformer blocks of {type(model).__name__}: expected "
                         "timm ViT / Swin blocks with an 'attn' module; set recompute='none', 'mlp' or 'block'")
    return names
