"""Block and attention recompute: a module saves only its input and recomputes the rest in backward.

`checkpoint_blocks(model)` runs each transformer block (wasi.blocks.find_blocks: timm, Hugging Face, any prefix)
under PyTorch's non-reentrant `torch.utils.checkpoint.checkpoint` (docs/method.md, Whole-step recompute), with its
positional and keyword arguments (attention masks, position embeddings); `checkpoint_attention(model)` does the same
for each block's attention module only (`wasi.blocks.attention_of`). Both work for any method (dense, PEFT LoRA,
SVD-LLM factors, ASI/WSI/WASI). The recomputation of a module holding subspace layers must not take a second
subspace-iteration step: through `checkpoint`'s `context_fn`, a `TuckerRecord` per call records each layer's Tucker
factors in the forward and replays them in the recomputation, so the factors, the warm-start state, the RNG and the
gradient are those of the first forward. A module without Tucker-compressing layers inside runs the plain
checkpoint (nothing to record), which torch.compile traces.

What a block run saves until backward: the block input (B, N, D) (ViT) or (B, H, W, C) (Swin) for each block,
plus the recorded Tucker core and factors of its ASI/WASI layers (what those layers save anyway); nothing
else of the block (no attention q, k, v, output or log-sum-exp, no LayerNorm or GELU input). An attention run
saves the attention's input (B, N, D) (Swin: the windows (B·nW, Wh·Ww, C)) instead of q, k, v (B, heads, N, d),
the attention output and the log-sum-exp, and recomputes the q, k, v projection, the attention and its output
projection in backward: a fraction of the block's forward.

A Hugging Face decoder layer (and its attention) writes the KV cache it is given; its recomputation would write it a
second time. Training needs no cache, so a checkpointed training call gets none (`use_cache=False`, as
transformers' own gradient checkpointing does), logged once; a cache that already holds states (generation) is
refused.
"""
from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from wasi.blocks import attention_of, find_blocks

__all__ = ["TuckerRecord", "active_record", "checkpoint_attention", "checkpoint_blocks", "is_checkpointed",
           "uncheckpoint_blocks"]

_local = threading.local()
_logger = logging.getLogger(__name__)
_cache_logged: list[bool] = []

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


def _checkpointed_forward(module: nn.Module, kind: str, *args: Any, **kwargs: Any) -> Any:
    """kind: what `module` is, "block" or "attention", for messages."""
    forward = type(module).forward
    if not (module.training and torch.is_grad_enabled()) or torch.jit.is_tracing() or torch.jit.is_scripting():
        return forward(module, *args, **kwargs)
    args, kwargs = _without_cache(args, kwargs, kind)
    if not any(getattr(m, "act_ranks", None) is not None for m in module.modules()):
        # no Tucker-compressing layer inside: nothing to record, and torch.compile traces the plain checkpoint
        return checkpoint(forward, module, *args, use_reentrant=False, **kwargs)
    record = TuckerRecord()
    return checkpoint(forward, module, *args, use_reentrant=False,
                      context_fn=functools.partial(TuckerRecord.contexts, record), **kwargs)


def _is_cache(value: Any) -> bool:
    """A Hugging Face KV cache (transformers.Cache, duck-typed so that the library needs no transformers)."""
    return value is not None and callable(getattr(value, "get_seq_length", None)) and hasattr(value, "update")


def _without_cache(args: tuple, kwargs: dict[str, Any], kind: str = "block") -> tuple[tuple, dict[str, Any]]:
    """args, kwargs of a checkpointed `kind` ("block", "attention") with any KV cache (positional or keyword) replaced
    by None and use_cache=False (module doc); ValueError for a cache that holds states already."""
    caches = [v for v in (*args, *kwargs.values()) if _is_cache(v)]
    if not caches and not kwargs.get("use_cache"):
        return args, kwargs
    for cache in caches:
        if cache.get_seq_length() > 0:
            module = "a block" if kind == "block" else "an attention module"
            raise ValueError(f"{kind} recompute cannot replay {module} that reads a KV cache holding "
                             f"{cache.get_seq_length()} positions; train without a cache (use_cache=False) or use "
                             "recompute='none'")
    if not _cache_logged:
        _cache_logged.append(True)
        _logger.warning("recompute: checkpointed blocks and attention modules run without a KV cache "
                        "(use_cache=False); training needs none")
    args = tuple(None if _is_cache(v) else v for v in args)
    kwargs = {k: None if _is_cache(v) else v for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def _checkpoint(module: nn.Module, kind: str) -> None:
    """Wrap `module`'s own forward (in place, idempotent) so that in training it recomputes in backward."""
    if not is_checkpointed(module):
        module.forward = functools.partial(_checkpointed_forward, module, kind)


def is_checkpointed(module: nn.Module) -> bool:
    """True when `checkpoint_blocks` or `checkpoint_attention` has made `module` recompute in backward."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _checkpointed_forward


def checkpoint_blocks(model: nn.Module) -> list[str]:
    """Make every transformer block of `model` (wasi.blocks.find_blocks: timm `blocks.<i>`, Swin
    `layers.<s>.blocks.<i>`, Hugging Face `encoder.layer.<i>`, `h.<i>`, `model.layers.<i>`, …) save only its
    input in training and recompute the rest in backward; returns the block names.

    In place and idempotent. Module names, state_dict keys and parameters are unchanged (the block's own
    `forward` is wrapped); in eval mode, without grad, or under TorchScript tracing the blocks run as before.
    Exact: gradients equal the un-checkpointed ones (dropout/drop-path RNG is replayed by checkpoint, Tucker
    factors by `TuckerRecord`).
    """
    names = find_blocks(model)
    if not names:
        raise ValueError(f"no transformer blocks found in {type(model).__name__} (a stack of same-type modules "
                         "holding linear layers, wasi.blocks.find_blocks); use recompute='none' or 'mlp'")
    for name in names:
        _checkpoint(model.get_submodule(name), "block")
    return names


def checkpoint_attention(model: nn.Module) -> list[str]:
    """Make the attention module of every transformer block of `model` (wasi.blocks.attention_of: timm `<block>.attn`,
    Hugging Face `attention` / `self_attn`, …) save only its input in training and recompute q, k, v, the attention
    and its output projection in backward; returns the attention modules' names. Nothing of size (B, heads, N, d)
    is held from forward to backward. The attention's other arguments (masks, position embeddings) pass through as
    `checkpoint_blocks` passes a block's. In place and idempotent, exact, as `checkpoint_blocks` (module names and
    state_dict unchanged)."""
    names = []
    for block_name in find_blocks(model):
        block = model.get_submodule(block_name)
        for child in attention_of(block):
            _checkpoint(block.get_submodule(child), "attention")
            names.append(f"{block_name}.{child}")
    if not names:
        raise ValueError(f"no attention modules found in the transformer blocks of {type(model).__name__} (a module "
                         "inside a block named attn, attention, self_attn or self_attention, "
                         "wasi.blocks.ATTENTION_MODULES); use recompute='none', 'mlp' or 'block'")
    return names


def uncheckpoint_blocks(model: nn.Module) -> list[str]:
    """Undo `checkpoint_blocks` and `checkpoint_attention`: every checkpointed module runs its own forward again;
    returns their names."""
    names = [n for n, m in model.named_modules() if is_checkpointed(m)]
    for name in names:
        del model.get_submodule(name).__dict__["forward"]
    return names
