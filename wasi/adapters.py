"""The base layers a subspace layer can replace, and the one helper that swaps a submodule.

Each base layer type has a small adapter that reads its weight as (O, I) and builds one back from an (O, I)
weight: `nn.Linear` (weight stored (O, I)) and transformers' `Conv1D` (GPT-2; y = x W + b with W stored
(I, O)). The library imports no model library: `Conv1D` is recognised only once transformers has loaded it.
"""
from __future__ import annotations

import sys
from typing import ClassVar

import torch
from torch import Tensor, nn

__all__ = ["ADAPTERS", "Conv1DAdapter", "LinearAdapter", "adapter_for", "adapter_named", "is_linear_like",
           "replace_module"]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where the submodule `name` ("blocks.0.mlp.fc1"; a ModuleList index is a name part too) is;
    returns the module it replaces. `name=""` (the model itself) cannot be replaced in place: ValueError."""
    if not name:
        raise ValueError("replace_module needs the qualified name of a submodule, not '' (the model itself)")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = parent.get_submodule(child)
    setattr(parent, child, new)
    return old


class LinearAdapter:
    """nn.Linear: weight (O, I), bias (O,) or None."""

    name: ClassVar[str] = "Linear"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @classmethod
    def weight(cls, module: nn.Module) -> Tensor:
        """The weight as (O, I)."""
        return module.get_parameter("weight")

    @classmethod
    def as_linear(cls, module: nn.Module) -> nn.Linear:
        """An nn.Linear computing the same map (the module itself when it is one)."""
        assert isinstance(module, nn.Linear)
        return module

    @classmethod
    def build(cls, weight: Tensor, bias: Tensor | None) -> nn.Module:
        """A new base layer with weight (O, I) and bias (O,) or None (copied), on weight's device and dtype."""
        o, i = weight.shape
        layer = nn.Linear(i, o, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def stored_weight(cls, weight: Tensor) -> Tensor:
        """A weight as this layer type stores it in a state_dict -> (O, I)."""
        return weight


class Conv1DAdapter(LinearAdapter):
    """transformers.pytorch_utils.Conv1D (GPT-2's projections): y = x W + b, W stored (I, O) = (nx, nf)."""

    name: ClassVar[str] = "Conv1D"

    @classmethod
    def _type(cls) -> type | None:
        module = sys.modules.get("transformers.pytorch_utils")
        return getattr(module, "Conv1D", None)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        conv1d = cls._type()
        return conv1d is not None and type(module) is conv1d

    @classmethod
    def weight(cls, module: nn.Module) -> Tensor:
        return module.get_parameter("weight").T

    @classmethod
    def as_linear(cls, module: nn.Module) -> nn.Linear:
        w = cls.weight(module).detach()
        bias = module.get_parameter("bias")
        return LinearAdapter.build(w, None if bias is None else bias.detach())  # type: ignore[return-value]

    @classmethod
    def build(cls, weight: Tensor, bias: Tensor | None) -> nn.Module:
        conv1d = cls._type()
        if conv1d is None:
            raise RuntimeError("rebuilding a Conv1D layer needs transformers: import transformers first")
        o, i = weight.shape
        layer = conv1d(o, i).to(weight.device, weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight.T)
            layer.bias.copy_(bias if bias is not None else torch.zeros_like(layer.bias))
        return layer

    @classmethod
    def stored_weight(cls, weight: Tensor) -> Tensor:
        return weight.T


#: Every base layer type the subspace layers can replace.
ADAPTERS: tuple[type[LinearAdapter], ...] = (LinearAdapter, Conv1DAdapter)


def adapter_for(module: nn.Module) -> type[LinearAdapter] | None:
    """The adapter of `module`'s type, or None when it is not a base layer the library converts."""
    return next((a for a in ADAPTERS if a.matches(module)), None)


def adapter_named(name: str) -> type[LinearAdapter]:
    """The adapter whose `name` is `name` ("Linear", "Conv1D"), as a summary records it."""
    for a in ADAPTERS:
        if a.name == name:
            return a
    raise ValueError(f"unknown base layer type {name!r}; known: {[a.name for a in ADAPTERS]}")


def is_linear_like(module: nn.Module) -> bool:
    """True for a base layer (nn.Linear, Conv1D) and for the library's subspace layers (`is_subspace_layer`)."""
    return adapter_for(module) is not None or bool(getattr(module, "is_subspace_layer", False))
