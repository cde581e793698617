"""Which modules `inject` converts, which one is the classifier head, and how `last_n` counts.

Presets (`targets="mlp"` / `"mlp+attn"`) are found from the model's structure under any prefix: the transformer
blocks (wasi.blocks), each block's MLP (the shallowest module inside it matching a form of wasi.mlp.MLP_FORMS:
fc1/fc2, gate/up/down, c_fc/c_proj, …) and, for "mlp+attn", the linears whose name inside the block ends with one of
ATTENTION_LINEARS. `target_modules` names the layers instead, with PEFT's semantics. Either way a target is a base
layer of wasi.adapters (nn.Linear, transformers' Conv1D), listed in registration order.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from wasi.adapters import adapter_for
from wasi.blocks import enclosing, find_blocks
from wasi.mlp import MlpForm, form_of

__all__ = ["ATTENTION_LINEARS", "HEAD_NAMES", "Mlp", "find_head", "find_mlps", "find_targets", "match_modules",
           "tuned_targets"]

#: The attention projections of a transformer block, as endings of a linear's name inside its block
#: ("attn.qkv" matches `<block>.attn.qkv` and `<block>.attn_block.attn.qkv`).
ATTENTION_LINEARS: tuple[str, ...] = (
    # timm: ViT and relatives, Swin, PVT v2, Hiera, MaxViT (attn.qkv, attn.proj); PVT v2 (attn.q, attn.kv);
    # CaiT/XCiT class attention (attn.q, attn.k, attn.v); ConViT GPSA (attn.qk, attn.v); EVA without fused qkv
    "attn.qkv", "attn.q", "attn.k", "attn.v", "attn.kv", "attn.qk", "attn.q_proj", "attn.k_proj", "attn.v_proj",
    "attn.proj",
    # Hugging Face ViT, Dinov2
    "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
    # Hugging Face BERT
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    # Hugging Face GPT-2 (Conv1D)
    "attn.c_attn", "attn.c_proj",
    # Hugging Face Llama family
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
)

#: Where a model without timm's `get_classifier()` keeps its head: top-level attributes tried in this order
#: (Hugging Face image and sequence classifiers: `classifier`, `score`; causal language models: `lm_head`).
HEAD_NAMES: tuple[str, ...] = ("classifier", "score", "head", "fc", "lm_head")


@dataclass(frozen=True)
class Mlp:
    """An MLP found in a block: `name` holds it (its linears are `<name>.<path>` for the form's paths)."""

    name: str
    form: MlpForm
    block: str

    @property
    def linears(self) -> list[str]:
        prefix = f"{self.name}." if self.name else ""
        return [prefix + p for p in self.form.linears]


def find_mlps(model: nn.Module, blocks: Sequence[str] | None = None) -> list[Mlp]:
    """Every block's MLP(s): the modules inside the block (the block itself included) matching a form of
    wasi.mlp.MLP_FORMS, at the smallest depth any match has in that block (so an MLP inside the attention, as
    timm's relative-position MLP, is not the block's MLP; MaxViT's two MLPs per block both are)."""
    found: list[Mlp] = []
    for block in find_blocks(model) if blocks is None else blocks:
        matches = []
        for rel, module in model.get_submodule(block).named_modules():
            form = form_of(module)
            if form is not None:
                matches.append((rel.count(".") + 1 if rel else 0, f"{block}.{rel}" if rel else block, form))
        if matches:
            depth = min(d for d, _, _ in matches)
            found += [Mlp(name, form, block) for d, name, form in matches if d == depth]
    return found


def _ends_with(name: str, ending: str) -> bool:
    return name == ending or name.endswith("." + ending)


def match_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Qualified names of the modules each of `names` matches (equal to it, or ending with "." + it), in
    registration order; ValueError naming the ones that match nothing."""
    qualified = [n for n, _ in model.named_modules() if n]
    unmatched = [p for p in names if not any(_ends_with(n, p) for n in qualified)]
    if unmatched:
        raise ValueError(f"no module of {type(model).__name__} is named {unmatched} (or ends with it); module names "
                         f"look like {qualified[:3] + qualified[-2:]}")
    return [n for n in qualified if any(_ends_with(n, p) for p in names)]


def find_head(model: nn.Module) -> list[str]:
    """Qualified names of the classifier head's modules: timm's `get_classifier()` of the outermost module that has
    one (a tuple for distilled DeiT: both heads; [] when it is an nn.Identity), else the first top-level attribute
    of HEAD_NAMES holding parameters, else the last base linear layer outside every block; [] when none is found."""
    modules = list(model.named_modules())
    ids = {id(m): n for n, m in reversed(modules)}
    for _, module in modules:
        get_classifier = getattr(module, "get_classifier", None)
        if callable(get_classifier):
            head = get_classifier()
            parts = head if isinstance(head, (tuple, list)) else (head,)
            return [ids[id(p)] for p in parts if isinstance(p, nn.Module) and id(p) in ids
                    and any(True for _ in p.parameters())]  # [] for a model built without a head
    for attr in HEAD_NAMES:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return [attr]
    blocks = find_blocks(model)
    outside = [n for n, m in modules if adapter_for(m) is not None and enclosing(blocks, n) is None]
    return outside[-1:]


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if adapter_for(m) is not None]


def find_targets(model: nn.Module, targets: str = "mlp", last_n: int | None = None,
                 target_modules: Sequence[str] | str | None = None) -> list[str]:
    """Qualified names of the base linear layers to convert, in registration order; those of the last `last_n`
    blocks when set (`tuned_targets`).

    target_modules (when not None, `targets` is not used): a list of names (each matching modules named it or
    ending with "." + it, which must be linear layers), a regular expression the whole name must match (linear
    layers only), or "all-linear" (every linear layer but the head, `find_head`).
    targets: "mlp" (every block's MLP linears, `find_mlps`) or "mlp+attn" (also ATTENTION_LINEARS).
    ValueError naming the fix when nothing matches (for instance on a model already converted).
    """
    kind = type(model).__name__
    if target_modules is not None:
        names = _named_targets(model, target_modules)
    else:
        if targets not in ("mlp", "mlp+attn"):
            raise ValueError(f"targets must be 'mlp' or 'mlp+attn', got {targets!r}")
        blocks = find_blocks(model)
        if not blocks:
            raise ValueError(f"no transformer blocks found in {kind} (a stack of same-type modules holding linear "
                             "layers): name the layers to convert with target_modules=[...] or 'all-linear'")
        chosen = {n for mlp in find_mlps(model, blocks) for n in mlp.linears}
        if targets == "mlp+attn":
            chosen |= {n for n in _linears(model) if (b := enclosing(blocks, n)) is not None
                       and any(_ends_with(n[len(b) + 1:], e) for e in ATTENTION_LINEARS)}
        names = [n for n in _linears(model) if n in chosen]
        if not names:
            raise ValueError(f"no {targets!r} target linears found in {kind}'s {len(blocks)} blocks (already "
                             "injected?): name the layers with target_modules=[...] or 'all-linear'")
    return names if last_n is None else tuned_targets(model, names, last_n)


def _named_targets(model: nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    kind, linears = type(model).__name__, _linears(model)
    if target_modules == "all-linear":
        head = find_head(model)
        names = [n for n in linears if not any(_ends_with(n, h) or n.startswith(h + ".") for h in head)]
    elif isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        names = [n for n in linears if pattern.fullmatch(n)]
    else:
        names = match_modules(model, target_modules)
        bad = [n for n in names if adapter_for(model.get_submodule(n)) is None]
        if bad:
            raise ValueError(f"target_modules={list(target_modules)} matches {bad[:3]} "
                             f"({type(model.get_submodule(bad[0])).__name__}), which are not nn.Linear or Conv1D "
                             "layers: name linear layers (or already injected?)")
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matches no linear layer of {kind} (already injected?); "
                         f"its linear layers are named like {linears[:3]}")
    return names


def tuned_targets(model: nn.Module, names: Sequence[str], last_n: int | None) -> list[str]:
    """The targets among `names` that lie in the last `last_n` blocks (`find_blocks`, registration order); a target
    outside every block counts as a block of its own. All of them when last_n is None or exceeds the count."""
    if last_n is None:
        return list(names)
    if last_n < 1:
        raise ValueError(f"last_n must be a positive int or None, got {last_n}")
    blocks = find_blocks(model)
    unit = {n: enclosing(blocks, n) or n for n in names}
    order = list(dict.fromkeys(unit[n] for n in names))
    kept = set(order[-last_n:])
    return [n for n in names if unit[n] in kept]
