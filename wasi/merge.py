"""Back to the plain architecture: `merge(model)` undoes what `inject` (or `rebuild`) did, in place.

Afterwards the model holds only its original module types, so its `state_dict()` loads with strict=True into a
fresh, never-injected copy of the architecture and that copy computes the same outputs; export and inference
then need no WASI code. WSI/WASI layers become their base layer (wasi.adapters) with weight L R, the product their
forward computes (with the "svd" update too, whose dense `weight` is the untruncated one the forward does not use).
"""
from __future__ import annotations

import torch
from torch import nn

from wasi.adapters import adapter_named, replace_module
from wasi.layers import ASILinear, WSILinear, untrack_token_grid
from wasi.mlp import unfuse
from wasi.recompute import uncheckpoint_blocks

__all__ = ["merge"]


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Replace every ASI/WSI/WASI layer of `model` by its base layer, and undo fused MLPs, block and attention
    recompute and token-grid hooks; returns `model`. A parameter keeps its `requires_grad` (the merged weight trains
    when the factors did). Idempotent: a model without subspace layers is returned as it is."""
    for module in model.modules():
        unfuse(module)
        untrack_token_grid(module)
    uncheckpoint_blocks(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (ASILinear, WSILinear))]
    for name, layer in layers:
        if isinstance(layer, WSILinear):
            weight, trains = layer.L @ layer.R, layer.L.requires_grad or layer._parameters.get("weight") is not None \
                and layer.weight.requires_grad
        else:
            weight, trains = layer.weight.detach(), layer.weight.requires_grad
        plain = adapter_named(layer.base).build(weight, None if layer.bias is None else layer.bias.detach())
        plain.train(layer.training)
        for p in plain.parameters():
            p.requires_grad_(trains)
        if layer.bias is not None:
            plain.get_parameter("bias").requires_grad_(layer.bias.requires_grad)
        replace_module(model, name, plain)
    return model
