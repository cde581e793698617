"""recompute="block" / checkpoint_blocks against recompute="none": same weights, Tucker warm start and dense grads,
far fewer saved and live bytes."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

import wasi
from experiments.measurement.metrics import activation_bytes
from tests.tiny_models import MODELS, batches, gradients, injected, saved_tensors, swin, train, vit
from wasi import checkpoint_blocks
from wasi.recompute import is_checkpointed


def assert_same_training(base, other, data, bf16: bool) -> None:
    """Train both on `data`: the same state dicts, Tucker warm-start factors and memory reports of every layer."""
    for m in (base, other):
        train(m, data, bf16=bf16)
    expected, got = base.state_dict(), other.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-5, msg=k)
    for (name, a), (_, b) in zip(wasi.factored_layers(base), wasi.factored_layers(other)):
        assert len(a.warm_start_state()) == len(b.warm_start_state())
        for u, v in zip(a.warm_start_state(), b.warm_start_state()):
            torch.testing.assert_close(v, u, msg=name)
        assert a.memory_report() == b.memory_report()


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
    assert_same_training(base, block, batches(MODELS[model_name][1]), bf16)


def count_subspace_calls(monkeypatch) -> dict[str, int]:
    """{"tucker": Tucker steps, "grad": factored gradients accumulated}, counted from now on."""
    calls = {"tucker": 0, "grad": 0}
    tucker, accumulate = wasi.layers.tucker, wasi.WSILinear.accumulate_factored_grad

    def counted_tucker(*a, **k):
        calls["tucker"] += 1
        return tucker(*a, **k)

    def counted_accumulate(self, g, p):
        calls["grad"] += 1
        return accumulate(self, g, p)

    monkeypatch.setattr(wasi.layers, "tucker", counted_tucker)
    monkeypatch.setattr(wasi.WSILinear, "accumulate_factored_grad", counted_accumulate)
    return calls


def test_recomputation_takes_no_second_subspace_step(monkeypatch):
    """One tucker call and one accumulate_factored_grad per layer per step, as without recompute."""
    model = injected("vit", recompute="block")
    calls = count_subspace_calls(monkeypatch)
    state = torch.get_rng_state()
    x, y = batches(32, n=1)[0]
    F.cross_entropy(model(x), y).backward()
    assert calls == {"tucker": 4, "grad": 4}
    assert torch.equal(torch.get_rng_state(), state)  # ViT has no dropout: nothing draws from the global RNG


def assert_same_dense_grads(plain, ckpt, size: int):
    """The grads of one batch of `size`-pixel images through both models agree, and so do their state_dict keys;
    returns the batch."""
    x, y = batches(size, n=1)[0]
    expected, got = gradients(plain, x, y), gradients(ckpt, x, y)
    assert got.keys() == expected.keys() and len(got) > 10
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-5, msg=k)
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    return x, y


@pytest.mark.parametrize("make", [vit, swin])
def test_vanilla_model_dense_grads_equal(make):
    """checkpoint_blocks on a plain timm model (any method: dense, LoRA, SVD-LLM): dense grads equal."""
    plain = make()
    ckpt = copy.deepcopy(plain)
    names = checkpoint_blocks(ckpt)
    assert names == wasi.blocks.find_blocks(plain) and len(names) in (2, 4)
    assert checkpoint_blocks(ckpt) == names  # idempotent
    x, y = assert_same_dense_grads(plain, ckpt, 32 if make is vit else 56)
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


# --- recompute="attn": every block's attention saves only its input ---

@pytest.mark.parametrize("model_name", ["vit", "swin"])
@pytest.mark.parametrize("config", [{}, {"activation": False}, {"weight": False}, {"train_rest": True},
                                    {"bf16": True}])
def test_attn_run_equals_none_run(model_name, config):
    """WASI (factored update, momentum) by default; WSI, ASI, with the rest trainable (attention included), and under
    bf16 autocast. Swin's drop path checks the RNG replay. Weights, Tucker warm-start factors and memory reports agree;
    with low-rank weights the MLPs are fused as in "mlp"."""
    config = dict(config)
    bf16 = config.pop("bf16", False)
    base, attn = injected(model_name, recompute="none", **config), injected(model_name, recompute="attn", **config)
    blocks = wasi.blocks.find_blocks(attn)
    assert all(is_checkpointed(attn.get_submodule(f"{b}.attn")) for b in blocks)
    assert not any(is_checkpointed(attn.get_submodule(b)) for b in blocks)
    fused = [m for m in attn.modules() if wasi.mlp.is_fused(m)]
    assert len(fused) == (len(blocks) if config.get("weight", True) else 0)
    assert_same_training(base, attn, batches(MODELS[model_name][1]), bf16)


def test_attn_recomputation_replays_tucker_factors_of_attention_layers(monkeypatch):
    """targets="mlp+attn": qkv and proj are WASI layers inside the recomputed attention. One Tucker step and one
    factored gradient per layer per step, as without recompute; the gradients are none's; no RNG is drawn."""
    base, attn = (injected("vit", recompute=mode, targets="mlp+attn") for mode in ("none", "attn"))
    calls = count_subspace_calls(monkeypatch)
    x, y = batches(32, n=1)[0]
    expected = gradients(base, x, y)
    calls.update(tucker=0, grad=0)
    state = torch.manual_seed(0).get_state()  # gradients() seeds the global RNG with 0; ViT has no dropout
    got = gradients(attn, x, y)
    assert calls == {"tucker": 8, "grad": 8}  # 2 blocks x (qkv, proj, fc1, fc2)
    assert torch.equal(torch.get_rng_state(), state)  # the recomputation drew nothing
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("make", [vit, swin])
def test_vanilla_attention_checkpoint_dense_grads_equal(make):
    """checkpoint_attention on a plain timm model (any method: dense, LoRA, SVD-LLM): dense grads equal."""
    plain = make()
    ckpt = copy.deepcopy(plain)
    names = wasi.checkpoint_attention(ckpt)
    assert names == [f"{b}.attn" for b in wasi.blocks.find_blocks(plain)]
    assert wasi.checkpoint_attention(ckpt) == names  # idempotent
    assert_same_dense_grads(plain, ckpt, 32 if make is vit else 56)
    torch.save(copy.deepcopy(ckpt), io.BytesIO())


def test_attn_holds_nothing_of_heads_and_costs_a_fraction_of_block_recompute():
    """Saved tensors of one training forward (autograd's saved-tensor hooks) and FLOPs of forward + backward
    (experiments.measurement.metrics.flop_counter, which counts oneDNN's linear too): "attn" saves no
    (B, heads, N, d) tensor and less than "mlp"; what it recomputes is at most the attention's forward (counted
    alone) and far below what "block" recomputes."""
    from experiments.measurement.metrics import flop_counter

    x, y = batches(32, n=1)[0]
    flops, saved_bytes, per_head = {}, {}, {}
    for mode in ("mlp", "attn", "block"):
        model = injected("vit", recompute=mode)
        F.cross_entropy(model(x), y).backward()  # warm start exists
        with flop_counter() as counter:
            loss, saved = saved_tensors(lambda m=model: F.cross_entropy(m(x), y))
            loss.backward()
        flops[mode], saved_bytes[mode] = counter.get_total_flops(), sum(t.numel() * t.element_size() for t in saved)
        per_head[mode] = [tuple(t.shape) for t in saved if tuple(t.shape) == (3, 2, 65, 24)]  # (B, heads, N, d)
    assert per_head["mlp"] and not per_head["attn"] and not per_head["block"]
    assert saved_bytes["block"] < saved_bytes["attn"] < saved_bytes["mlp"]
    model = injected("vit", recompute="none").eval()
    inputs = {}
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, args[0]))
    with torch.no_grad():
        model(x)
        with flop_counter() as counter:
            for i, block in enumerate(model.blocks):
                block.attn(inputs[i])
    attention_forward = counter.get_total_flops()
    assert 0 < flops["attn"] - flops["mlp"] <= attention_forward
    assert flops["attn"] - flops["mlp"] < (flops["block"] - flops["mlp"]) / 4


def test_checkpoint_attention_needs_attention_modules():
    with pytest.raises(ValueError, match="no attention modules"):
        wasi.checkpoint_attention(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_attention_linears_lie_in_attention_modules():
    """wasi.blocks.ATTENTION_MODULES is where a block's attention is; the "mlp+attn" preset's projections
    (wasi.targets.ATTENTION_LINEARS) are named inside those modules."""
    from wasi.blocks import ATTENTION_MODULES
    from wasi.targets import ATTENTION_LINEARS

    assert all(ending.split(".")[0] in ATTENTION_MODULES for ending in ATTENTION_LINEARS)


def test_attn_recompute_rebuilds_and_merges():
    """A Hugging Face Llama with recompute="attn": to_config() records the checkpointed attention modules, rebuild
    re-creates them without data (strict load, same gradients), merge removes them with the fused MLPs."""
    from tests.families import FAMILIES
    from wasi.probe import logits_of, run_model

    family = FAMILIES["hf_llama"]
    x, y = family.batch(2, 0)
    model = family.build()
    summary = wasi.inject(model, wasi.WASIConfig(recompute="attn"), calibration=(x, y))
    assert summary.checkpointed_attention == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert summary.recomputed == summary.fused_mlps + summary.checkpointed_attention
    again = family.build()
    rebuilt = wasi.rebuild(again, summary.to_config())
    again.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.checkpointed_attention == summary.checkpointed_attention
    assert all(is_checkpointed(again.get_submodule(n)) for n in summary.checkpointed_attention)
    def grads(net):
        F.cross_entropy(logits_of(run_model(net, x)), y).backward()
        out = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        return out | {n: layer.factored_grad[0] @ layer.factored_grad[1].T for n, layer in wasi.factored_layers(net)}

    expected, got = grads(model), grads(again)
    assert got.keys() == expected.keys() and len(got) > 5
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], msg=k)
    wasi.merge(again)
    assert not any(is_checkpointed(m) or wasi.mlp.is_fused(m) for m in again.modules())
