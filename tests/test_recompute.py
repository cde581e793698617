"""recompute="block" / checkpoint_blocks against recompute="none": same weights, Tucker warm start and dense grads,
far fewer saved and live bytes."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

import wasi
from experiments.measurement.metrics import activation_bytes
from tests.tiny_models import MODELS, batches, gradients, injected, swin, train, vit
from wasi import checkpoint_blocks
from wasi.recompute import is_checkpointed


@pytest.mark.parametrize("model_name", ["vit", "swin"])
@pytest.mark.parametrize("config", [{}, {"recompute_none_is": "mlp"}, {"activation": False}, {"train_rest": True},
                                    {"bf16": True}])
def test_block_run_equals_none_run(model_name, config):
    """WASI (factored update, momentum) by default; also against the fused-MLP run, WSI, with the rest trainable,
    and under bf16 autocast. Swin's drop path checks the RNG replay. Weights and the layers' Tucker warm-start
    factors must agree."""
    config = dict(config)
    reference = config.pop("recompute_none_is", "none")
    bf16 = config.pop("bf16", False)
    base, block = injected(model_name, recompute=reference, **config), injected(model_name, recompute="block", **config)
    assert all(is_checkpointed(block.get_submodule(n)) for n in wasi.blocks.find_blocks(block))
    fused = [m for m in block.modules() if wasi.mlp.is_fused(m)]  # low-rank MLPs also recompute u Lᵀ
    assert len(fused) == (len(wasi.blocks.find_blocks(block)) if config.get("weight", True) else 0)
    data = batches(MODELS[model_name][1])
    for m in (base, block):
        train(m, data, bf16=bf16)
    expected, got = base.state_dict(), block.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-5, msg=k)
    for (name, a), (_, b) in zip(wasi.factored_layers(base), wasi.factored_layers(block)):
        assert len(a.warm_start_state()) == len(b.warm_start_state())
        for u, v in zip(a.warm_start_state(), b.warm_start_state()):
            torch.testing.assert_close(v, u, msg=name)
        assert a.memory_report() == b.memory_report()


def test_recomputation_takes_no_second_subspace_step(monkeypatch):
    """One tucker call and one accumulate_factored_grad per layer per step, as without recompute."""
    model = injected("vit", recompute="block")
    calls = {"tucker": 0, "grad": 0}
    tucker = wasi.layers.tucker
    monkeypatch.setattr(wasi.layers, "tucker", lambda *a, **k: calls.__setitem__("tucker", calls["tucker"] + 1)
                        or tucker(*a, **k))
    accumulate = wasi.WSILinear.accumulate_factored_grad
    monkeypatch.setattr(wasi.WSILinear, "accumulate_factored_grad",
                        lambda self, g, p: calls.__setitem__("grad", calls["grad"] + 1) or accumulate(self, g, p))
    state = torch.get_rng_state()
    x, y = batches(32, n=1)[0]
    F.cross_entropy(model(x), y).backward()
    assert calls == {"tucker": 4, "grad": 4}
    assert torch.equal(torch.get_rng_state(), state)  # ViT has no dropout: nothing draws from the global RNG


@pytest.mark.parametrize("make", [vit, swin])
def test_vanilla_model_dense_grads_equal(make):
    """checkpoint_blocks on a plain timm model (any method: dense, LoRA, SVD-LLM): dense grads equal."""
    plain = make()
    ckpt = copy.deepcopy(plain)
    names = checkpoint_blocks(ckpt)
    assert names == wasi.blocks.find_blocks(plain) and len(names) in (2, 4)
    assert checkpoint_blocks(ckpt) == names  # idempotent
    size = 32 if make is vit else 56
    x, y = batches(size, n=1)[0]
    expected, got = gradients(plain, x, y), gradients(ckpt, x, y)
    assert got.keys() == expected.keys() and len(got) > 10
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-5, msg=k)
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    copied = copy.deepcopy(ckpt)  # the wrapped forward follows the copy
    assert all(copied.get_submodule(n).forward.args[0] is copied.get_submodule(n) for n in names)
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)  # and pickles
    ckpt.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(ckpt(x), plain(x))


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("activation", [True, False])
def test_block_run_saves_and_holds_far_less(activation):
    """Bytes packed by autograd's saved-tensor hooks, and bytes of every storage the forward creates that is still
    alive at its end (followed op by op, experiments.measurement.metrics.activation_bytes).
    A block run holds each block's input (B, N, D) plus the recorded Tucker factors; "mlp" sits in between."""
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 5, (16,))
    saved, live = {}, {}
    for mode in ("none", "mlp", "block"):
        model = injected("vit", recompute=mode, activation=activation, train_rest=True)
        F.cross_entropy(model(x), y).backward()  # first step: warm-start state exists
        model.zero_grad(set_to_none=True)
        for _, layer in wasi.factored_layers(model):
            layer.factored_grad = None
        saved[mode] = _saved_bytes(lambda m=model: F.cross_entropy(m(x), y))
        live[mode] = activation_bytes(lambda m=model: F.cross_entropy(m(x), y), model)
    assert saved["block"] < saved["none"] / 4 and saved["mlp"] < saved["none"]  # block: the stem, norm and head
    block_inputs = 2 * 16 * 65 * 48 * 4  # what checkpoint keeps for the 2 blocks
    assert block_inputs <= live["block"] < live["none"] / 4
    assert live["mlp"] < live["none"]


def test_eval_and_no_grad_run_the_plain_forward():
    model = injected("vit", recompute="block")
    x = batches(32, n=1)[0][0]
    with torch.no_grad():
        out = model(x)
    model.eval()
    assert _saved_bytes(lambda: model(x)) > 0  # eval with grad: ordinary autograd saves, no checkpoint
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(x), out)


def test_checkpoint_blocks_needs_blocks():
    with pytest.raises(ValueError, match="no transformer blocks"):
        checkpoint_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
