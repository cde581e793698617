"""set_trainable / WASIConfig.train_rest on tiny timm ViT and Swin; "before the first target" against the order in
which the forward pass first uses each parameter."""
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import wasi
from tests.tiny_models import MODELS, batches, injected, swin, train, vit
from wasi import find_targets, set_trainable


class _FirstUse(TorchFunctionMode):
    """Records parameter names in the order torch functions first receive them."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.order: list[str] = []

    def _visit(self, obj) -> None:
        if isinstance(obj, (list, tuple)):
            for o in obj:
                self._visit(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                self._visit(o)
        elif isinstance(obj, torch.Tensor) and id(obj) in self.names and self.names[id(obj)] not in self.order:
            self.order.append(self.names[id(obj)])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self._visit(args)
        self._visit(kwargs or {})
        return func(*args, **(kwargs or {}))


def _used_before(model, size: int, module: str) -> set[str]:
    """Parameters the forward uses before it first uses a parameter of `module`."""
    mode = _FirstUse(model)
    with torch.no_grad(), mode:
        model(batches(size, n=1)[0][0])
    assert set(mode.order) == {n for n, _ in model.named_parameters()}  # every parameter is used
    first = next(i for i, n in enumerate(mode.order) if n.startswith(module + "."))
    return set(mode.order[:first])


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("make, size, last_n", [(vit, 32, 2), (vit, 32, 1), (swin, 56, 2), (swin, 56, 3)])
def test_last_n_freezes_exactly_what_the_forward_uses_before_the_first_target(make, size, last_n):
    model = make()
    names = find_targets(model)
    first = wasi.tuned_targets(model, names, last_n)[0]  # the first target of the last last_n blocks
    assert first == names[-2 * last_n]  # two MLP linears per block
    before = _used_before(model, size, first)
    assert set(wasi.trainable.params_before(model, first)) == before
    set_trainable(model, names, train_rest=True, last_n=last_n)
    everything = {n for n, _ in model.named_parameters()}
    assert _trainable(model) == everything - before
    assert "head.weight" in _trainable(model) or "head.fc.weight" in _trainable(model)
    if make is swin and last_n == 2:  # first target layers.1.blocks.0.mlp.fc1: stage 1's patch merging is frozen
        assert "layers.1.downsample.reduction.weight" in before and "layers.1.blocks.0.attn.qkv.weight" in before


@pytest.mark.parametrize("make", [vit, swin])
def test_train_rest_and_default(make):
    model = make()
    names = find_targets(model)
    set_trainable(model, names, train_rest=True)
    assert _trainable(model) == {n for n, _ in model.named_parameters()}
    set_trainable(model, names)  # default: targets and head only
    everything = {n for n, _ in model.named_parameters()}
    head = {f"{n}.{p}" for n in ("head", "head.fc") for p in ("weight", "bias")} & everything
    assert _trainable(model) == {f"{n}.{p}" for n in names for p in ("weight", "bias")} | head
    set_trainable(model, names, last_n=1)  # the last block's two MLP linears
    assert _trainable(model) == {f"{n}.{p}" for n in names[-2:] for p in ("weight", "bias")} | head


def test_parameters_inside_targets_are_left_to_the_method():
    """A LoRA-adapted target keeps its frozen base weight frozen and its adapters trainable, whatever the rule."""
    peft = pytest.importorskip("peft")
    model = vit()
    names = find_targets(model)
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=names[-2:]), model)
    set_trainable(model, names, train_rest=True, last_n=1)
    fc = "blocks.1.mlp.fc2"
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not flags[f"{fc}.base_layer.weight"] and flags[f"{fc}.lora_A.default.weight"]
    assert not flags["blocks.1.attn.qkv.weight"] and flags["norm.weight"] and flags["head.weight"]
    assert not flags["blocks.1.mlp.fc1.base_layer.weight"] and flags["blocks.1.mlp.fc1.lora_B.default.weight"]
    assert not flags["blocks.0.mlp.fc2.weight"] and not flags["cls_token"]


@pytest.mark.parametrize("model_name", ["vit", "swin"])
def test_inject_train_rest_trains_the_rest_with_subspace_sgd(model_name):
    model = injected(model_name, train_rest=True, last_n=2)
    names = find_targets(MODELS[model_name][0]())
    frozen = set(wasi.trainable.params_before(model, names[-4]))  # before the MLP of the last-but-one block
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, batches(MODELS[model_name][1], n=2))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert frozen and moved == {n for n, _ in model.named_parameters()} - frozen
    assert any(".norm1." in n for n in moved) and any(".attn." in n for n in moved)
    default = injected(model_name)
    assert _trainable(default) == {n for n, _ in default.named_parameters()
                                   if ".mlp.fc" in n or n.startswith("head")}


def test_errors_and_frozen_prefix_under_block_recompute():
    with pytest.raises(ValueError, match="at least one target"):
        set_trainable(vit(), [])
    with pytest.raises(ValueError, match="last_n"):
        set_trainable(vit(), ["blocks.0.mlp.fc1"], train_rest=True, last_n=0)
    x, y = batches(32, n=1)[0]
    model = injected("vit", train_rest=True, recompute="block", target_modules=["blocks.1.mlp.fc2"], last_n=1)
    F.cross_entropy(model(x), y).backward()
    assert model.norm.weight.grad is not None and model.blocks[1].mlp.fc2.factored_grad is not None
    assert model.blocks[1].norm2.weight.grad is None and model.blocks[1].mlp.fc1.weight.grad is None
