"""Every model family (tests/families.py: timm and Hugging Face, tiny, random init): inject with the default targets
trains; a full-rank WASI/WSI/ASI step equals a dense twin's plain SGD step; merge and rebuild round-trip with
strict=True; the recompute modes give the gradients of "none"."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wasi
from tests.families import FAMILIES
from tests.tiny_models import saved_tensors
from wasi import WASIConfig, inject, merge, rebuild
from wasi.adapters import adapter_for
from wasi.mlp import is_fused
from wasi.probe import logits_of, run_model
from wasi.recompute import is_checkpointed

#: Families the fast tier checks for every method and recompute mode (each kind of layout once); the slow tier: all.
CORE = ["vit", "swin", "maxvit", "eva02", "hf_vit", "hf_bert", "hf_gpt2", "hf_llama"]
METHODS = {"wasi": {}, "wsi": {"activation": False}, "asi": {"weight": False}}
#: Families whose MLPs the fused path does not take (the first one, as the refusal names it).
UNFUSED = {"hf_bert": "bert.encoder.layer.0", "pvt_v2": "stages.0.blocks.0.mlp", "tiny_vit": "stages.1.blocks.0.mlp"}
#: Where each family's blocks keep their attention (recompute="attn" checkpoints these); the others: `attn`.
ATTENTION = {"maxvit": ["attn_block.attn", "attn_grid.attn"], "hf_vit": ["attention"],
             "hf_dinov2_swiglu": ["attention"], "hf_bert": ["attention"], "hf_llama": ["self_attn"]}


def _tiers(names: list[str]) -> list:
    return [n if n in CORE else pytest.param(n, marks=pytest.mark.slow) for n in names]


def _loss(model: nn.Module, x, y) -> torch.Tensor:
    """Cross entropy from global RNG seed 0 (MaxViT's relative-position MLP has dropout)."""
    torch.manual_seed(0)
    return F.cross_entropy(logits_of(run_model(model, x)), y)


def _eval(model: nn.Module, x) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = logits_of(run_model(model, x))
    model.train()
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_default_inject_trains_merges_and_rebuilds(name):
    """WASIConfig() as it comes: the MLP linears of every block convert, the head trains, a clipped SubspaceSGD step
    moves the factors; merge gives the plain architecture (strict load, same outputs); rebuild from to_config()
    re-creates the injected one without data (strict load, same outputs)."""
    family = FAMILIES[name]
    model, (x, y) = family.build(), family.batch(2, 0)
    summary = inject(model, WASIConfig(), calibration=(x, y))
    assert summary.layers and all(isinstance(model.get_submodule(l.name), (wasi.WSILinear, wasi.ASILinear))
                                  for l in summary.layers)
    assert not any(adapter_for(m) is not None for n, m in model.named_modules()
                   if any(n == l.name for l in summary.layers))
    head = wasi.find_head(model)
    assert head and all(p.requires_grad for h in head for p in model.get_submodule(h).parameters())
    assert all(any(h == t or h.startswith(t + ".") for t in summary.trains) for h in head)  # listed as training
    factor = model.get_submodule(summary.layers[-1].name).R.detach().clone()
    optimizer = wasi.SubspaceSGD(model, lr=0.1)
    loss = _loss(model, x, y)
    loss.backward()
    assert torch.isfinite(wasi.clip_grad_norm_(model, 1.0))
    optimizer.step()
    assert not torch.equal(model.get_submodule(summary.layers[-1].name).R, factor)

    merged = merge(copy.deepcopy(model))
    assert not any(isinstance(m, (wasi.WSILinear, wasi.ASILinear)) or is_fused(m) for m in merged.modules())
    plain = family.build()
    plain.load_state_dict(merged.state_dict(), strict=True)
    torch.testing.assert_close(_eval(plain, x), _eval(model, x), atol=1e-5, rtol=1e-4)

    rebuilt = family.build()
    again = rebuild(rebuilt, summary.to_config())
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert [l.name for l in again.layers] == [l.name for l in summary.layers]
    assert again.trains == summary.trains and again.fused_mlps == summary.fused_mlps
    torch.testing.assert_close(_eval(rebuilt, x), _eval(model, x))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", _tiers(list(FAMILIES)))
def test_full_rank_step_equals_dense_sgd(name, method):
    """ε = ε_act = 1 keeps every direction: one step (weight decay included) is torch.optim.SGD's on the dense
    twin with the same trainable set, and the forward before it is the dense one."""
    family = FAMILIES[name]
    x, y = family.batch(3, 1)
    dense, model = family.build(), family.build()
    options = METHODS[method]
    summary = inject(model, WASIConfig(epsilon=1.0, epsilon_act=None if options.get("activation") is False else 1.0,
                                       recompute="none", **options), calibration=(x, y))
    wasi.set_trainable(dense, [l.name for l in summary.layers])
    losses = []
    for net, optimizer in ((model, wasi.SubspaceSGD(model, lr=0.2, weight_decay=1e-2)),
                           (dense, torch.optim.SGD([p for p in dense.parameters() if p.requires_grad], lr=0.2,
                                                   weight_decay=1e-2))):
        loss = _loss(net, x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_eval(model, x), _eval(dense, x), atol=2e-5, rtol=1e-4)


def _gradients(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    _loss(model, x, y).backward()
    out = {f"{n}.grad": p.grad for n, p in model.named_parameters() if p.grad is not None}
    out.update({f"{n}.G_Pt": l.factored_grad[0] @ l.factored_grad[1].T for n, l in wasi.factored_layers(model)
                if l.factored_grad is not None})
    return out


@pytest.mark.parametrize("mode", ["mlp", "attn", "block"])
@pytest.mark.parametrize("method", ["wasi", "wsi"])
@pytest.mark.parametrize("name", _tiers(["vit", "swin", "eva02", "maxvit", "hf_vit", "hf_dinov2_swiglu", "hf_gpt2",
                                         "hf_llama", "hf_bert", "cait", "hiera", "pvt_v2", "tiny_vit", "davit"]))
def test_recompute_gives_the_gradients_of_none(name, method, mode, monkeypatch):
    """Fused MLPs (plain, GLU-chunked, gated), attention recompute (with the MLPs fused where they can be) and block
    recompute (Hugging Face blocks and attention modules take masks and position embeddings as keyword arguments)
    against recompute="none", with the rest of the model training too. Compared at a second step, warm-started
    from the first one's Tucker factors: WASI's fused MLPs then take their output projection's feature-mode
    product in its forward product (counted)."""
    family = FAMILIES[name]
    x, y = family.batch(2, 3)
    if mode == "mlp" and name in UNFUSED:
        with pytest.raises(ValueError, match=rf"recompute='mlp' cannot fuse the MLP {UNFUSED[name]} .*: .*; set "
                                             r"recompute='none' or recompute='block'"):
            inject(family.build(), WASIConfig(recompute="mlp", **METHODS[method]), calibration=(x, y))
        return
    models = []
    for recompute in ("none", mode):
        model = family.build()
        summary = inject(model, WASIConfig(epsilon=0.9, train_rest=True, recompute=recompute, **METHODS[method]),
                         calibration=(x, y))
        models.append(model)
    if mode in ("mlp", "attn"):
        fused = [] if name in UNFUSED else [m.name for m in wasi.targets.find_mlps(models[1])]
        assert summary.fused_mlps == fused and all(is_fused(models[1].get_submodule(m)) for m in fused)
    if mode == "attn":
        assert summary.checkpointed_attention == [f"{b}.{a}" for b in wasi.find_blocks(models[1])
                                                  for a in ATTENTION.get(name, ["attn"])]
        assert all(is_checkpointed(models[1].get_submodule(a)) for a in summary.checkpointed_attention)
        assert not summary.checkpointed_blocks
    if mode == "block":
        assert summary.checkpointed_blocks == wasi.find_blocks(models[1])
    for model in models:  # the first step's forward and backward leave the Tucker warm start
        _loss(model, x, y).backward()
        model.zero_grad(set_to_none=True)
        for _, layer in wasi.factored_layers(model):
            layer.factored_grad = None
    widened = []
    real = wasi.mlp.linear_forward_with
    monkeypatch.setattr(wasi.mlp, "linear_forward_with", lambda *a: widened.append(a[2].shape) or real(*a))
    expected, got = _gradients(models[0], x, y), _gradients(models[1], x, y)
    assert got.keys() == expected.keys() and len(got) > 5
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)
    assert bool(widened) == (method == "wasi" and any(is_fused(m) for m in models[1].modules()))


@pytest.mark.parametrize("activation", [True, False])
@pytest.mark.parametrize("name", ["eva02", "hf_llama", "hf_dinov2_swiglu", "hf_gpt2", "hf_vit"])
def test_fused_mlps_save_nothing_of_the_hidden_width(name, activation):
    """Plain, GLU-chunked and gated MLPs, fused: autograd saves the input projections' inputs (Tucker factors or x)
    and their u = x Rᵀ (…, K), never a tensor of the hidden width (…, H)."""
    family = FAMILIES[name]
    model, batch = family.build(), family.batch(2, 0)
    summary = inject(model, WASIConfig(activation=activation), calibration=batch)
    mlp = model.get_submodule(summary.fused_mlps[0])
    form = wasi.mlp.fused_form(mlp)
    out = mlp.get_submodule(form.output)
    x = torch.randn(2, 7, out.out_features, requires_grad=True)
    y, saved = saved_tensors(lambda: mlp(x))
    hidden = out.in_features  # H: the output projection's input width
    assert saved and not any(t.shape[:2] == (2, 7) and t.shape[-1] >= hidden for t in saved)
    assert {(2, 7, mlp.get_submodule(p).rank) for p in form.inputs} <= {tuple(t.shape) for t in saved}  # the u's
    y.sum().backward()
    assert x.grad is not None
    plain = copy.deepcopy(mlp)
    wasi.mlp.unfuse(plain)  # the same layers through the module's own forward: the activation saves (…, H)
    _, saved = saved_tensors(lambda: plain(x))
    assert any(t.shape[:2] == (2, 7) and t.shape[-1] >= hidden for t in saved)


@pytest.mark.parametrize("name", ["eva02", "hf_llama"])
def test_fused_gated_mlps_with_the_dense_weight_update(name):
    """weight_update="reference" (a dense weight taking the gradient): the fused gated MLPs' dense weight
    gradients equal the unfused ones."""
    family = FAMILIES[name]
    x, y = family.batch(2, 3)
    models = [family.build(), family.build()]
    for model, recompute in zip(models, ("none", "mlp")):
        inject(model, WASIConfig(epsilon=0.9, weight_update="reference", recompute=recompute), calibration=(x, y))
    expected, got = _gradients(models[0], x, y), _gradients(models[1], x, y)
    assert got.keys() == expected.keys()
    assert any(k.endswith(("mlp.fc2.weight.grad", "down_proj.weight.grad")) for k in got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)
