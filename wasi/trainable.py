"""Which parameters train: the converted (or adapted) targets, the classifier head, `modules_to_save`, and optionally
the rest.

One rule for every method of a suite (dense fine-tuning, PEFT LoRA, SVD-LLM factors, ASI/WSI/WASI), so they
compare at the same trainable set (docs/method.md, Variants and which layers train).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from wasi.targets import find_head, match_modules, tuned_targets

__all__ = ["params_before", "set_trainable", "trained_modules"]

_logger = logging.getLogger(__name__)


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
                  last_n: int | None = None, modules_to_save: Sequence[str] | None = None) -> list[str]:
    """Set `requires_grad` of every parameter of `model` outside the fine-tuned targets; returns what trains
    (`trained_modules`).

    target_names: every target module in registration order (e.g. `find_targets(model, targets)` taken before the
    targets were converted or adapted); the fine-tuned ones are those in the last `last_n` blocks
    (wasi.targets.tuned_targets; all when None). Parameters inside the fine-tuned targets are left as they are:
    the method decides (every factor of a WSI/WASI layer trains; LoRA trains its adapters, not its frozen base).
    modules_to_save: names (exact or "."-suffix) of modules that train densely besides the classifier head
    (wasi.targets.find_head).
    Everything else:
      train_rest=False: frozen, except the head and modules_to_save. A model without a findable head needs
        modules_to_save (an empty list: only the targets train); otherwise ValueError, so nothing is frozen silently;
      train_rest=True, last_n None: trainable, as the authors' `num_of_finetune=all` (attention, norms,
        embeddings and head train densely next to the targets);
      train_rest=True, last_n set: frozen when registered before the first fine-tuned target (`params_before`),
        trainable after it, as the authors' "last n" runs (the head and modules_to_save train wherever they are).
    """
    if not target_names:
        raise ValueError("set_trainable needs at least one target module name")
    tuned = tuned_targets(model, target_names, last_n)
    inside = {id(p) for name in tuned for p in model.get_submodule(name).parameters()}
    head = find_head(model)
    if not head and modules_to_save is None and not train_rest:
        raise ValueError(f"no classifier head found in {type(model).__name__} (no get_classifier(), no top-level "
                         "classifier/score/head attribute, no linear layer outside the transformer blocks), so only "
                         "the targets would train: name the modules that train densely with modules_to_save=[...] "
                         "(modules_to_save=[] for none), or set train_rest=True")
    dense = [*head, *match_modules(model, list(modules_to_save or []))]
    keep = {id(p) for name in dense for p in model.get_submodule(name).parameters()}
    if train_rest:
        frozen = set(params_before(model, tuned[0])) if last_n is not None else set()
        for name, p in model.named_parameters():
            if id(p) not in inside:
                p.requires_grad_(name not in frozen or id(p) in keep)
    else:
        for p in model.parameters():
            if id(p) not in inside:
                p.requires_grad_(id(p) in keep)
    trains = trained_modules(model)
    _logger.info("head %s; trainable: %s", head or "none found", ", ".join(trains))
    return trains


def trained_modules(model: nn.Module) -> list[str]:
    """What trains, briefly: the outermost modules (below the model itself) all of whose parameters require grad,
    and the trainable parameters of modules that train only in part, in registration order."""
    modules = list(model.named_modules())
    whole: dict[str, bool] = {}
    for name, module in reversed(modules):
        params = list(module.parameters())
        whole[name] = bool(params) and all(p.requires_grad for p in params)
    out: list[str] = []
    for name, module in modules:
        parent = name.rpartition(".")[0] if name else None
        if not name and whole[name]:  # everything trains: the top-level modules say what
            whole[name] = False
        if whole[name] and (parent is None or not whole[parent]):
            out.append(name)
        elif not whole[name]:
            prefix = f"{name}." if name else ""
            out += [prefix + n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    return out
