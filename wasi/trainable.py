"""Which parameters train: the converted (or adapted) targets, the classifier head, and optionally the rest.

One rule for every method of a suite (dense fine-tuning, PEFT LoRA, SVD-LLM factors, ASI/WSI/WASI), so they
compare at the same trainable set (docs/method.md, Variants and which layers train).
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["params_before", "set_trainable"]


def params_before(model: nn.Module, name: str) -> list[str]:
    """Names of the parameters registered before module `name`: those `model.named_parameters()` yields before
    the first parameter of `name` (module registration order, which is forward order for timm ViT and Swin:
    embeddings, then each block's norm1, attention, norm2, MLP, …)."""
    model.get_submodule(name)  # raises AttributeError for an unknown module
    before: list[str] = []
    for module_name, module in model.named_modules():
        if module_name == name:
            return before
        prefix = f"{module_name}." if module_name else ""
        before += [prefix + n for n, _ in module.named_parameters(recurse=False)]
    return before


def set_trainable(model: nn.Module, target_names: Sequence[str], train_rest: bool = False,
                  last_n: int | None = None) -> None:
    """Set `requires_grad` of every parameter of `model` outside the fine-tuned targets.

    target_names: every target module in forward order (e.g. `find_targets(model, targets)` taken before the
    targets were converted or adapted); the fine-tuned ones are the last `last_n` of them (all when None).
    Parameters inside the fine-tuned targets are left as they are: the method decides (every factor of a
    WSI/WASI layer trains; LoRA trains its adapters, not its frozen base weight).
    Everything else:
      train_rest=False: frozen, except the classifier head (`model.get_classifier()`, when the model has one);
      train_rest=True, last_n None: trainable, as the authors' `num_of_finetune=all` (attention, norms,
        embeddings and head train densely next to the targets);
      train_rest=True, last_n set: frozen when registered before the first fine-tuned target (`params_before`),
        trainable after it, as the authors' "last n" runs.
    """
    if not target_names:
        raise ValueError("set_trainable needs at least one target module name")
    if last_n is not None and last_n < 1:
        raise ValueError(f"last_n must be a positive int or None, got {last_n}")
    tuned = list(target_names) if last_n is None else list(target_names)[-last_n:]
    inside = {id(p) for name in tuned for p in model.get_submodule(name).parameters()}
    if train_rest:
        frozen = set(params_before(model, tuned[0])) if last_n is not None else set()
        for name, p in model.named_parameters():
            if id(p) not in inside:
                p.requires_grad_(name not in frozen)
        return
    get_classifier = getattr(model, "get_classifier", None)
    head = {id(p) for p in get_classifier().parameters()} if callable(get_classifier) else set()
    for p in model.parameters():
        if id(p) not in inside:
            p.requires_grad_(id(p) in head)
