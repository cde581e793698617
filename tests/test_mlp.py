"""recompute="mlp" (fused MLPs, wasi.mlp) against recompute="none": same gradients and weights, nothing of the
hidden width (…, H) saved."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import wasi
from tests.tiny_models import MODELS, batches, gradients, injected, saved_tensors, train
from wasi import WASIConfig, WASIConfigError, WASILinear, WSILinear, inject
from wasi.mlp import MLP_FORMS, fuse, is_fused, unfuse

VARIANTS = {  # WASIConfig kwargs per method variant
    "wasi": {},
    "wsi": {"activation": False},
    "wasi_reference": {"weight_update": "reference"},
    "wsi_svd": {"activation": False, "weight_update": "svd"},
}


def _pair(model_name: str, **config):
    return [injected(model_name, recompute=r, **config) for r in ("none", "mlp")]


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_name", ["vit", "swin"])
def test_gradients_equal_recompute_none(model_name, variant, bf16):
    """Input grad, factored G Pᵀ, dense weight grads, biases and every other trainable parameter (train_rest:
    the LayerNorm before each MLP gets its grad through the fused MLP's dx)."""
    none, mlp = _pair(model_name, train_rest=True, **VARIANTS[variant])
    assert all(is_fused(m) for n, m in mlp.named_modules() if n.endswith(".mlp"))
    assert not any(is_fused(m) for m in none.modules())
    x, y = batches(MODELS[model_name][1], n=1)[0]
    expected, got = gradients(none, x, y, bf16), gradients(mlp, x, y, bf16)
    assert got.keys() == expected.keys()
    assert any(k.endswith("norm2.weight.grad") for k in got) and any(k.endswith("mlp.fc1.bias.grad") for k in got)
    assert any(k.endswith(".G_Pt") for k in got) == (variant in ("wasi", "wsi"))
    assert any(k.endswith("fc1.weight.grad") for k in got) == (variant in ("wasi_reference", "wsi_svd"))
    tol = {"atol": 1e-2, "rtol": 1e-2} if bf16 else {"atol": 1e-6, "rtol": 1e-5}
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], **tol, msg=k)


@pytest.mark.parametrize("act", [nn.GELU(approximate="tanh"), nn.SiLU()], ids=["gelu_tanh", "silu"])
def test_other_activations_equal_recompute_none(act):
    """GELU's backward runs by its own kernel (its approximate mode too), any other activation through autograd."""
    make, size, ranks = MODELS["vit"]
    models = []
    for recompute in ("none", "mlp"):
        model = make()
        for block in model.blocks:
            block.mlp.act = copy.deepcopy(act)
        x, y = batches(size, n=1)[0]
        inject(model, WASIConfig(epsilon=0.9, ranks=ranks, recompute=recompute, train_rest=True), (x, y))
        models.append(model)
    expected, got = gradients(models[0], x, y, False), gradients(models[1], x, y, False)
    assert got.keys() == expected.keys() and any(k.endswith("fc1.bias.grad") for k in got)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("variant", ["wasi", "wsi"])
@pytest.mark.parametrize("model_name", ["vit", "swin"])
def test_weights_after_momentum_steps_equal_recompute_none(model_name, variant, monkeypatch):
    """From the second step on, WASI's fused MLP takes the output projection's Tucker product a U^prev of the
    feature mode in its forward product (wasi.functional.linear_forward_with); WSI keeps no Tucker factors."""
    none, mlp = _pair(model_name, **VARIANTS[variant])
    data = batches(MODELS[model_name][1])
    widened = []
    real = wasi.mlp.linear_forward_with
    monkeypatch.setattr(wasi.mlp, "linear_forward_with", lambda *a: widened.append(a[2].shape) or real(*a))
    for m in (none, mlp):
        train(m, data)
    n_mlps = sum(is_fused(m) for m in mlp.modules())
    assert len(widened) == (n_mlps * (len(data) - 1) if variant == "wasi" else 0)
    expected, got = none.state_dict(), mlp.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-5, msg=k)
    for (name, a), (_, b) in zip(wasi.factored_layers(none), wasi.factored_layers(mlp)):
        assert a.memory_report() == b.memory_report(), name
        for u, v in zip(a.warm_start_state(), b.warm_start_state()):
            torch.testing.assert_close(v, u, msg=name)


@pytest.mark.parametrize("activation", [True, False])
def test_saves_only_low_rank_u_and_the_layers_inputs(activation):
    """One ViT MLP on (B, N, 48) tokens, hidden 192: saved = fc1's input (Tucker or dense x), u = x R₁ᵀ (B, N, K₁),
    fc2's Tucker factors (WASI) or nothing (WSI); the plain Mlp also saves GELU's (B, N, 192) input."""
    model = injected("vit", activation=activation, recompute="mlp")
    mlp = model.blocks[0].mlp
    assert is_fused(mlp)
    x = torch.randn(3, 65, 48, requires_grad=True)
    y, saved = saved_tensors(lambda: mlp(x))
    k1 = mlp.fc1.rank
    hidden = mlp.fc1.out_features
    assert not any(t.shape[-1] == hidden and t.dim() == 3 for t in saved)
    u = [t for t in saved if t.shape == (3, 65, k1)]
    assert len(u) == 1
    torch.testing.assert_close(u[0], x.detach() @ mlp.fc1.R.T)
    if activation:
        expected = mlp.fc1.memory_report()["activation_bytes"] + mlp.fc2.memory_report()["activation_bytes"]
    else:
        expected = x.numel() * 4
    assert sum(t.numel() * t.element_size() for t in saved) == expected + u[0].numel() * 4
    plain = copy.deepcopy(model.blocks[0].mlp)
    unfuse(plain)  # the same submodules, plain timm forward
    assert type(plain) is timm.layers.Mlp and not is_fused(plain)
    _, plain_saved = saved_tensors(lambda: plain(x))
    assert any(t.shape == (3, 65, hidden) for t in plain_saved)
    y.sum().backward()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace, which fvcore uses
def test_state_dict_eval_path_and_tracing():
    none, mlp = _pair("vit")
    assert list(mlp.state_dict()) == list(none.state_dict())
    assert "blocks.0.mlp.fc1.L" in mlp.state_dict()
    assert [n for n, _ in wasi.factored_layers(mlp)] == [n for n, _ in wasi.factored_layers(none)]
    x = batches(32, n=1)[0][0]
    none.eval(), mlp.eval()
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), none(x))
    ops = {n.kind() for n in torch.jit.trace(mlp.blocks[0].mlp, torch.randn(2, 65, 48)).inlined_graph.nodes()}
    assert "aten::linear" in ops and not any("PythonOp" in o for o in ops)


def test_injection_errors_name_the_fix():
    torch.manual_seed(0)
    dropped = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=1,
                                num_heads=2, num_classes=5, proj_drop_rate=0.1)
    batch = batches(32, n=1)[0]
    with pytest.raises(ValueError, match=r"recompute='mlp' cannot fuse the MLP blocks.0.mlp \(Mlp, timm Mlp\): the "
                                         r"fused path does not replay dropout between the layers \(drop1: .*set "
                                         r"recompute='none' or recompute='block'"):
        inject(dropped, WASIConfig(ranks=[2, 4, 4], recompute="mlp"), batch)
    assert type(dropped.blocks[0].mlp.fc1) is nn.Linear  # refused before converting anything
    inject(copy.deepcopy(dropped), WASIConfig(ranks=[2, 4, 4], recompute="block"), batch)  # the named fix works
    summary = inject(dropped, WASIConfig(ranks=[2, 4, 4]), batch)  # the default recompute: left unfused, named
    assert summary.recompute == "mlp" and summary.fused_mlps == [] and not is_fused(dropped.blocks[0].mlp)
    with pytest.raises(WASIConfigError, match="recompute='mlp': .*; set recompute='none' or recompute='block'"):
        WASIConfig(weight=False, ranks=[2, 4, 4], recompute="mlp")
    assert WASIConfig(weight=False, ranks=[2, 4, 4]).recompute_mode == "none"
    assert WASIConfig(ranks=[2, 4, 4]).recompute_mode == "mlp"
    with pytest.raises(WASIConfigError, match="recompute='all': must be one of"):
        WASIConfig(ranks=[2, 4, 4], recompute="all")
    normed = timm.layers.Mlp(8, 16, norm_layer=nn.LayerNorm)
    normed.fc1, normed.fc2 = WSILinear.from_linear(normed.fc1, 0.9), WSILinear.from_linear(normed.fc2, 0.9)
    with pytest.raises(ValueError, match="hidden norm"):
        fuse(normed, MLP_FORMS[1])


def test_only_mlps_with_both_linears_converted_are_fused():
    model = injected("vit", target_modules=["blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"])
    assert is_fused(model.blocks[1].mlp) and not is_fused(model.blocks[0].mlp)
    assert isinstance(model.blocks[0].mlp.fc2, WASILinear) and type(model.blocks[0].mlp.fc1) is nn.Linear
    x, y = batches(32, n=1)[0]
    F.cross_entropy(model(x), y).backward()
    assert model.blocks[0].mlp.fc2.factored_grad is not None
