"""torch.compile of subspace models: one graph per training step, no recompiles across layers, the same numbers as
eager. Backend aot_eager (Dynamo + AOTAutograd, no code generation) in the fast tier, inductor under -m slow."""
import copy

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from torch import nn

import wasi
from tests.families import FAMILIES
from tests.tiny_models import batches, injected, vit
from wasi.mlp import GatedMlp, GluMlp, PlainMlp, fused_form
from wasi.probe import logits_of, run_model

torch.set_num_threads(1)


def _assert_same_state(eager: nn.Module, compiled: nn.Module) -> None:
    """Weights, buffers and the Tucker warm-start factors of two models after the same steps."""
    for (key, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=key)
    for (key, a), (_, b) in zip(wasi.factored_layers(eager), wasi.factored_layers(compiled)):
        for u, v in zip(a.warm_start_state(), b.warm_start_state()):
            torch.testing.assert_close(v, u, atol=1e-5, rtol=1e-4, msg=key)


def _step(model, opt, x, y, forward=None):
    opt.zero_grad()
    loss = F.cross_entropy((model if forward is None else forward)(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize("recompute", ["mlp", "none", "attn"])
def test_a_training_step_is_one_graph(recompute):
    """After the first step (random Tucker start, first gradient carriers), the forward and loss trace as one graph
    with no break: no generator, no side effect inside an autograd Function, no tensor made mid-graph; "attn"'s
    checkpointed attention holds no Tucker-compressing layer, so torch.compile traces its checkpoint too. ("block"
    breaks once per block: its checkpoint records the blocks' Tucker factors through a context_fn.)"""
    model = injected("vit", recompute=recompute)
    opt = wasi.SubspaceSGD(model, 0.05)
    x, y = batches(32, n=1)[0]
    _step(model, opt, x, y)
    explained = dynamo.explain(lambda x, y: F.cross_entropy(model(x), y))(x, y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("recompute", [None, wasi.checkpoint_attention, wasi.checkpoint_blocks])
def test_a_dense_model_is_one_graph(recompute):
    model = vit().train()
    if recompute is not None:
        recompute(model)
    x, y = batches(32, n=1)[0]
    explained = dynamo.explain(lambda x, y: F.cross_entropy(model(x), y))(x, y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def _compiled_against_eager(backend, recompute="mlp", steps=4, eager_first=False):
    eager = injected("vit", recompute=recompute)
    compiled = copy.deepcopy(eager)
    data = batches(32, n=steps)
    opts = [wasi.SubspaceSGD(m, 0.05, momentum=0.9, weight_decay=1e-3) for m in (eager, compiled)]
    if eager_first:  # the first step (random Tucker start) eagerly on both, then the steady state compiled
        _step(eager, opts[0], *data[0])
        _step(compiled, opts[1], *data[0])
        data = data[1:]
    forward = torch.compile(compiled, backend=backend)
    for x, y in data:
        loss_eager = _step(eager, opts[0], x, y)
        loss_compiled = _step(compiled, opts[1], x, y, forward)
        torch.testing.assert_close(loss_compiled, loss_eager, atol=1e-5, rtol=1e-5)
    _assert_same_state(eager, compiled)


def test_compiled_training_equals_eager():
    """Losses of every step, weights and Tucker warm-start factors after SGD steps with momentum; one graph for all
    the steps, though each step hands the CPU factors L and R new storage (wasi.optim._store)."""
    from torch._dynamo.utils import counters
    counters.clear()
    _compiled_against_eager("aot_eager", steps=3, eager_first=True)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("recompute", ["mlp", "none"])
def test_compiled_from_the_first_step_equals_eager(recompute):
    """Compiled from the first step on (its random Tucker start and first gradient carriers break the graph once
    per layer; later steps are one graph), with inductor's generated code."""
    _compiled_against_eager("aot_eager", recompute)
    dynamo.reset()
    _compiled_against_eager("inductor", recompute)


def test_blocks_compiled_one_by_one_share_one_graph():
    """Regional compilation: every block runs the same compiled graph. Each layer's seed is a tensor buffer, not an
    int attribute, so no layer specialises the graph (with the rest trainable, every block input needs grad)."""
    model = injected("vit", recompute="mlp", train_rest=True)
    opt = wasi.SubspaceSGD(model, 0.05)
    data = batches(32, n=3)
    _step(model, opt, *data[0])
    assert len({layer.seed for _, layer in wasi.factored_layers(model)}) == 4
    for block in model.blocks:
        block.compile(backend="aot_eager")
    dynamo.utils.counters.clear()
    for x, y in data[1:]:
        _step(model, opt, x, y)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1


# --- any transformer: Conv1D layers (GPT-2), GLU-chunked (EVA-02) and gated (Llama) fused MLPs, HF attention ---

def _family_loss(model, x, y):
    return F.cross_entropy(logits_of(run_model(model, x)), y)


def _family_injected(name, recompute, **config):
    """A tiny `name` (tests/families.py) with WASI, everything else training, after one SubspaceSGD step."""
    family = FAMILIES[name]
    model, (x, y) = family.build(), family.batch(2, 0)
    summary = wasi.inject(model, wasi.WASIConfig(recompute=recompute, train_rest=True, **config), calibration=(x, y))
    opt = wasi.SubspaceSGD(model, 0.05, momentum=0.9)
    _family_loss(model, x, y).backward()
    opt.step()
    opt.zero_grad()
    return model, opt, summary


#: (family, recompute, what it exercises): the fused form of its MLPs, or its layers' base type; the first in the
#: fast tier (a gated fused MLP and a Hugging Face attention checkpointed with its keyword arguments)
FAMILY_STEPS = [("hf_llama", "attn", GatedMlp), ("eva02", "mlp", GluMlp), ("hf_gpt2", "none", "Conv1D")]


@pytest.mark.parametrize("name, recompute, exercised", [
    FAMILY_STEPS[0], *(pytest.param(*case, marks=pytest.mark.slow) for case in [
        *FAMILY_STEPS[1:], ("hf_llama", "mlp", GatedMlp), ("hf_llama", "none", "Linear"), ("eva02", "attn", GluMlp),
        ("hf_gpt2", "attn", PlainMlp), ("hf_vit", "attn", PlainMlp), ("swin", "attn", PlainMlp)])])
def test_a_training_step_of_any_family_is_one_graph(name, recompute, exercised):
    """Hugging Face models (keyword inputs, attention masks, position embeddings into a checkpointed attention),
    Conv1D-based layers and the GLU and gated fused MLPs: after the first step, one graph and no break."""
    model, _, summary = _family_injected(name, recompute)
    if isinstance(exercised, str):
        assert {layer.base for layer in summary.layers} == {exercised} and not summary.fused_mlps
    else:
        assert summary.fused_mlps and all(
            isinstance(fused_form(model.get_submodule(m)), exercised) for m in summary.fused_mlps)
    assert bool(summary.checkpointed_attention) == (recompute == "attn")
    x, y = FAMILIES[name].batch(2, 1)
    explained = dynamo.explain(lambda x, y: _family_loss(model, x, y))(x, y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow
@pytest.mark.parametrize("name, recompute, exercised", FAMILY_STEPS)
def test_compiled_family_training_equals_eager(name, recompute, exercised):
    """Losses of every step, weights and Tucker warm-start factors after compiled SGD steps with momentum."""
    eager, opt_eager, _ = _family_injected(name, recompute)
    compiled = copy.deepcopy(eager)
    opt_compiled = wasi.SubspaceSGD(compiled, 0.05, momentum=0.9)
    opt_compiled.load_state_dict(copy.deepcopy(opt_eager.state_dict()))  # state_dict() shares the buffers
    forward = torch.compile(compiled, backend="aot_eager")
    for seed in (1, 2, 3):
        x, y = FAMILIES[name].batch(2, seed)
        losses = []
        for opt, run in ((opt_eager, eager), (opt_compiled, forward)):
            opt.zero_grad()
            loss = _family_loss(run, x, y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    _assert_same_state(eager, compiled)


def test_llama_decoder_layers_compiled_one_by_one_share_one_graph():
    """Regional compilation of a Hugging Face Llama: every decoder layer (gated fused MLP, checkpointed attention
    taking position embeddings and the mask as keywords) runs the same compiled graph; the layers' seeds differ.
    Fixed activation ranks, so that every layer's Tucker factors have the same shapes."""
    model, opt, _ = _family_injected("hf_llama", "attn", ranks=[2, 4, 8])
    layers = wasi.factored_layers(model)
    assert len({layer.seed for _, layer in layers}) == len(layers) == 6
    for block in wasi.find_blocks(model):
        model.get_submodule(block).compile(backend="aot_eager")
    dynamo.utils.counters.clear()
    for seed in (1, 2):
        x, y = FAMILIES["hf_llama"].batch(2, seed)
        opt.zero_grad()
        _family_loss(model, x, y).backward()
        opt.step()
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 1
