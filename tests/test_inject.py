"""inject / find_targets / WASIConfig on tiny timm ViT and Swin models, against hand counts."""
import copy
import io

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from wasi import (
    ASILinear,
    InfeasibleBudgetError,
    SubspaceSGD,
    WASIConfig,
    WASIConfigError,
    WASILinear,
    WSILinear,
    build_rank_table,
    clip_grad_norm_,
    factored_layers,
    find_targets,
    inject,
    solve_budget,
)
from wasi.ranks import ranks_for

VIT_MLP = ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
HEAD = 192 * 10 + 10


def _vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=10)


def _swin(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=24,
                             depths=(1, 1), num_heads=(1, 2), window_size=7, num_classes=5)


def _batch(n: int = 4, size: int = 32, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def _rank(m: torch.Tensor, eps: float) -> int:
    """Explained-variance rank of a matrix from its float64 singular values."""
    values = torch.linalg.svdvals(m.double()).numpy()
    frac = np.cumsum(values ** 2) / np.sum(values ** 2)
    return min(int(np.searchsorted(frac, eps - 1e-12)) + 1, len(values))


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_find_targets_vit_and_swin():
    vit = _vit()
    assert find_targets(vit) == VIT_MLP
    assert find_targets(vit, "mlp+attn") == [f"blocks.{i}.{m}" for i in (0, 1) for m in
                                             ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert find_targets(vit, last_n=1) == VIT_MLP[2:]  # the last block
    assert find_targets(vit, last_n=3) == VIT_MLP  # more blocks than the model has: all of them
    assert find_targets(_swin()) == ["layers.0.blocks.0.mlp.fc1", "layers.0.blocks.0.mlp.fc2",
                                     "layers.1.blocks.0.mlp.fc1", "layers.1.blocks.0.mlp.fc2"]
    with pytest.raises(ValueError, match="no transformer blocks found in Sequential.*target_modules"):
        find_targets(nn.Sequential(nn.Linear(2, 2)))


def test_inject_vit_fixed_ranks_converts_freezes_and_counts():
    model = _vit()
    original = copy.deepcopy(model)
    total_before = sum(p.numel() for p in model.parameters())
    summary = inject(model, WASIConfig(epsilon=0.7, ranks=[2, 4, 8]), calibration=_batch())
    assert [l.name for l in summary.layers] == VIT_MLP
    expected_trainable, saved = HEAD, 0
    for info in summary.layers:
        layer, linear = model.get_submodule(info.name), original.get_submodule(info.name)
        assert isinstance(layer, WASILinear) and layer.act_ranks == [2, 4, 8]
        k = _rank(linear.weight.detach(), 0.7)
        o, i = linear.out_features, linear.in_features
        assert (info.weight_rank, info.in_features, info.out_features) == (k, i, o)
        assert (info.params_before, info.params_after) == (o * i + o, k * (o + i) + o)
        expected_trainable += k * (o + i) + o
        saved += o * i - k * (o + i)
    assert _trainable(model) == {f"{n}.{p}" for n in VIT_MLP for p in ("L", "R", "bias")} | {"head.weight", "head.bias"}
    assert summary.trainable_params == expected_trainable
    assert summary.total_params == total_before - saved
    assert [n for n, _ in factored_layers(model)] == VIT_MLP
    assert summary.to_dict()["layers"][0]["act_ranks"] == [2, 4, 8]


def test_inject_last_n_only_converts_and_trains_the_last_blocks():
    model = _vit()
    summary = inject(model, WASIConfig(ranks=[2, 4, 8], last_n=1), calibration=_batch())
    assert [l.name for l in summary.layers] == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert all(type(model.get_submodule(n)) is nn.Linear for n in VIT_MLP[:2])
    assert _trainable(model) == {f"blocks.1.mlp.{f}.{p}" for f in ("fc1", "fc2") for p in ("L", "R", "bias")} | \
        {"head.weight", "head.bias"}
    assert summary.trains == ["blocks.1.mlp", "head"]
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    assert model.blocks[1].mlp.fc2.factored_grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(("head", "blocks.1.mlp")))


def test_inject_swin_asi_mlp_and_attn():
    model = _swin()
    # fixed ranks cannot serve 3-mode attention and 4-mode (B, H, W, C) MLP inputs at once: ε_act ranks
    summary = inject(model, WASIConfig(weight=False, epsilon_act=0.5, targets="mlp+attn"),
                     calibration=_batch(2, 56, 5))
    names = [l.name for l in summary.layers]
    assert names == [f"layers.{s}.blocks.0.{m}" for s in (0, 1)
                     for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert all(isinstance(model.get_submodule(n), ASILinear) for n in names)
    assert all(l.weight_rank is None and l.params_after == l.params_before for l in summary.layers)
    assert _trainable(model) == ({f"{n}.{p}" for n in names for p in ("weight", "bias")}
                                 | {"head.fc.weight", "head.fc.bias"})
    x, y = _batch(2, 56, 5)
    F.cross_entropy(model(x), y).backward()
    assert all(model.get_submodule(n).weight.grad is not None for n in names)
    assert model.get_submodule(names[-1]).memory_report()["activation_bytes"] > 0


def test_inject_wsi_and_reference_mode():
    model = _vit()
    inject(model, WASIConfig(activation=False, weight_update="reference", last_n=1), calibration=_batch())
    layer = model.blocks[1].mlp.fc1
    assert type(layer) is WSILinear and layer.act_ranks is None
    assert _trainable(model) == {f"blocks.1.mlp.{f}.{p}" for f in ("fc1", "fc2") for p in ("weight", "bias")} | \
        {"head.weight", "head.bias"}
    torch.testing.assert_close(layer.weight, layer.L @ layer.R)


def test_epsilon_act_ranks_are_truncated_hosvd_of_layer_inputs():
    model = _vit()
    x, y = _batch()
    inputs = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: inputs.__setitem__(n, a[0].detach())) for n in VIT_MLP]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    model.train()
    summary = inject(model, WASIConfig(epsilon_act=0.7), calibration=(x, y))
    for info in summary.layers:
        a = inputs[info.name]
        expected = [_rank(a.movedim(m, 0).reshape(a.shape[m], -1), 0.7) for m in range(a.dim())]
        assert info.act_ranks == expected == model.get_submodule(info.name).act_ranks
        assert info.act_epsilon == 0.7
    assert model.training


def test_budget_ranks_come_from_the_rank_table():
    x, y = _batch()
    table = build_rank_table(_vit(), VIT_MLP, x, y, (0.4, 0.6, 0.8))
    budget = sum(min(row) for row in table.memory_bytes) + 2000
    model = _vit()
    summary = inject(model, WASIConfig(budget_bytes=budget, eps_set=(0.4, 0.6, 0.8)), calibration=(x, None),
                     rank_table=table)
    expected = ranks_for(table, solve_budget(table, budget))
    assert {l.name: l.act_ranks for l in summary.layers} == expected
    assert summary.rank_table is table
    built = inject(_vit(), WASIConfig(budget_bytes=budget, eps_set=(0.4, 0.6, 0.8)), calibration=(x, y))
    assert built.rank_table.ranks == table.ranks
    with pytest.raises(InfeasibleBudgetError):
        inject(_vit(), WASIConfig(budget_bytes=10), calibration=(x, None), rank_table=table)
    with pytest.raises(ValueError, match="calibration"):
        inject(_vit(), WASIConfig(budget_bytes=budget))
    with pytest.raises(ValueError, match="needs labels"):
        inject(_vit(), WASIConfig(budget_bytes=budget), calibration=(x, None))
    with pytest.raises(ValueError, match="rebuild"):
        inject(_vit(), WASIConfig(budget_bytes=budget, last_n=1), calibration=(x, y), rank_table=table)


def test_state_dict_round_trips_into_fresh_injected_model():
    config = WASIConfig(epsilon=0.7, ranks=[2, 4, 8])
    model = _vit()
    inject(model, config, calibration=_batch())
    opt = SubspaceSGD(model, 0.05, momentum=0.9)
    for seed in range(2):
        x, y = _batch(seed=seed)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert sorted(k for k in model.state_dict() if k.startswith("blocks.0.mlp.fc1.")) == \
        ["blocks.0.mlp.fc1.L", "blocks.0.mlp.fc1.R", "blocks.0.mlp.fc1.bias"]
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _vit()
    inject(fresh, config, calibration=_batch(seed=3))
    fresh.load_state_dict(torch.load(buffer))
    x, _ = _batch(seed=7)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_bf16_autocast_training_step_on_vit():
    model = _vit()
    inject(model, WASIConfig(ranks=[2, 4, 8]), calibration=_batch())
    before = model.blocks[0].mlp.fc1.L.detach().clone()
    opt = SubspaceSGD(model, 0.05, momentum=0.9)
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    loss.backward()
    assert torch.isfinite(clip_grad_norm_(model, 1.0))
    opt.step()
    layer = model.blocks[0].mlp.fc1
    assert layer.L.dtype == torch.float32 and not torch.equal(layer.L, before)
    torch.testing.assert_close(layer.L.T @ layer.L, torch.eye(layer.rank), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs, field, message", [
    ({"epsilon": 1.5, "ranks": [2, 2, 2]}, "epsilon", "epsilon=1.5: must be in (0, 1]; set epsilon=0.8"),
    ({"epsilon": 0.0, "ranks": [2, 2, 2]}, "epsilon", "epsilon=0.0: must be in (0, 1]"),
    ({"epsilon_act": 1.2}, "epsilon_act", "epsilon_act=1.2: must be in (0, 1]; set epsilon_act=0.8"),
    ({"ranks": [4, -1, 8]}, "ranks", "ranks=[4, -1, 8]: must be positive ints"),
    ({"ranks": [2, 2, 2], "epsilon_act": 0.5}, "ranks", "ranks=[2, 2, 2]: epsilon_act also chooses the activation"),
    ({"ranks": [2, 2, 2], "budget_bytes": 10}, "budget_bytes", "budget_bytes=10: ranks also chooses"),
    ({"activation": False, "ranks": [2, 2, 2]}, "ranks", "ranks=[2, 2, 2]: activation ranks only apply when "
     "activation=True; set ranks=None"),
    ({"weight": False, "activation": False}, "weight", "weight=False: with activation=False too, nothing is "
     "compressed; set weight=True"),
    ({"budget_bytes": 0}, "budget_bytes", "budget_bytes=0: must be positive"),
    ({"ranks": [2, 2, 2], "targets": "all"}, "targets", "targets='all': must be one of ('mlp', 'mlp+attn'); "
     "set targets='mlp'"),
    ({"ranks": [2, 2, 2], "target_modules": []}, "target_modules", "target_modules=[]: names no module"),
    ({"ranks": [2, 2, 2], "last_n": 0}, "last_n", "last_n=0: must be a positive int or None"),
    ({"ranks": [2, 2, 2], "weight_update": "dense"}, "weight_update", "set weight_update='factored'"),
    ({"ranks": [2, 2, 2], "recompute": "all"}, "recompute", "recompute='all': must be one of"),
    ({"weight": False, "recompute": "mlp"}, "recompute", "recompute='mlp': recomputes fc1's output"),
    ({"ranks": [2, 2, 2], "eps_set": (0.5, 1.5)}, "eps_set", "eps_set=(0.5, 1.5): must be non-empty"),
])
def test_config_errors_name_the_field_its_value_and_a_fix(kwargs, field, message):
    """Messages name WASIConfig fields (the library's terms), and the error carries field, value and fix."""
    with pytest.raises(WASIConfigError) as err:
        WASIConfig(**kwargs)
    assert message in str(err.value) and "method." not in str(err.value) and "\n" not in str(err.value)
    assert err.value.field == field and err.value.value == kwargs.get(field, err.value.value)


def test_activation_ranks_default_to_the_weight_epsilon_unless_ranks_or_a_budget_is_chosen():
    assert WASIConfig(epsilon=0.6).epsilon_act == 0.6
    assert WASIConfig(epsilon=0.6, epsilon_act=0.9).epsilon_act == 0.9
    assert WASIConfig(ranks=[2, 2, 2]).epsilon_act is None
    assert WASIConfig(budget_bytes=1000).epsilon_act is None
    assert WASIConfig(activation=False).epsilon_act is None


def test_epsilon_act_needs_calibration():
    with pytest.raises(ValueError, match="calibration=\\(x, y\\)"):
        inject(_vit(), WASIConfig(epsilon_act=0.8))


# --- Swin MLP inputs are compressed as (B, H, W, C) ---

def _swin_mlp_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each MLP linear's (B, H·W, C) input with its block's (H, W) map, reshaped by hand to (B, H, W, C)."""
    inputs, grids = {}, {}
    handles = [blk.register_forward_pre_hook(lambda m, a, n=n: grids.__setitem__(n, a[0].shape[1:3]))
               for n, blk in model.named_modules() if n.endswith(("blocks.0", "blocks.1")) and "layers" in n]
    names = find_targets(model)
    handles += [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: inputs.__setitem__(n, a[0].detach().reshape(a[0].shape[0], *grids[n.rsplit(".mlp", 1)[0]],
                                                                          a[0].shape[-1]))) for n in names]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    model.train()
    return inputs


def test_swin_mlp_inputs_are_four_mode_tucker():
    model = _swin()
    x, y = _batch(2, 56, 5)
    inputs = _swin_mlp_inputs(copy.deepcopy(model), x)
    assert {n: tuple(a.shape) for n, a in inputs.items()} == {
        "layers.0.blocks.0.mlp.fc1": (2, 14, 14, 24), "layers.0.blocks.0.mlp.fc2": (2, 14, 14, 96),
        "layers.1.blocks.0.mlp.fc1": (2, 7, 7, 48), "layers.1.blocks.0.mlp.fc2": (2, 7, 7, 192)}
    inject(model, WASIConfig(ranks=[2, 5, 4, 8], recompute="none"), calibration=(x, y))
    captured = {}

    def capture(name):
        def hook(module, args, output):  # the training input (drop path on) and the output grad
            captured[name] = args[0].detach().reshape(inputs[name].shape)
            output.register_hook(lambda g: captured.__setitem__(name + ".dy", g))
        return hook

    for name, layer in factored_layers(model):
        layer.register_forward_hook(capture(name))
    F.cross_entropy(model(x), y).backward()
    for name, layer in factored_layers(model):
        factors = layer.warm_start_state()
        a = captured[name]
        assert [u.shape for u in factors] == [(n, min(r, n)) for n, r in zip(a.shape, [2, 5, 4, 8])]
        assert layer.token_grid == a.shape[1:3]
        core = torch.einsum("bhwc,bi,hj,wk,cl->ijkl", a, *factors)
        x_hat = torch.einsum("ijkl,bi,hj,wk,cl->bhwc", core, *factors)
        dy = captured[name + ".dy"]
        g, p = layer.factored_grad
        torch.testing.assert_close(g @ p.T, dy.reshape(-1, dy.shape[-1]).T @ x_hat.reshape(-1, a.shape[-1]),
                                   atol=1e-5, rtol=1e-4)
        assert layer.memory_report()["activation_bytes"] == 4 * (core.numel() + sum(u.numel() for u in factors))


def test_swin_fixed_ranks_need_four_entries_and_vit_three():
    swin_batch = _batch(2, 56, 5)
    with pytest.raises(ValueError, match=r"\(2, 14, 14, 24\) as its block's \(B, H, W, C\) map\): give 4 ranks, one "
                                         r"per mode, e.g. ranks=\[8, 8, 8, 8\]"):
        inject(_swin(), WASIConfig(ranks=[2, 8, 8]), calibration=swin_batch)
    with pytest.raises(ValueError, match="give 3 ranks"):
        inject(_vit(), WASIConfig(ranks=[2, 8, 8, 8]), calibration=_batch())
    with pytest.raises(ValueError, match="different mode counts .*use epsilon_act"):
        inject(_swin(), WASIConfig(ranks=[2, 8, 8, 8], targets="mlp+attn"), calibration=swin_batch)
    swin = _swin()
    inject(swin, WASIConfig(weight=False, ranks=[2, 8, 8, 8], last_n=2), calibration=swin_batch)  # ASI: the same
    assert swin.get_submodule("layers.1.blocks.0.mlp.fc1").act_ranks == [2, 8, 8, 8]


def test_swin_epsilon_act_ranks_are_four_mode_hosvd():
    model = _swin()
    x, y = _batch(2, 56, 5)
    inputs = _swin_mlp_inputs(copy.deepcopy(model), x)
    summary = inject(model, WASIConfig(epsilon_act=0.7), calibration=(x, y))
    for info in summary.layers:
        a = inputs[info.name]
        assert info.act_ranks == [_rank(a.movedim(m, 0).reshape(a.shape[m], -1), 0.7) for m in range(4)]
    F.cross_entropy(model(x), y).backward()  # 4 ranks fit the 4-mode inputs


def test_token_grid_hook_follows_deep_copies():
    model = _swin()
    inject(model, WASIConfig(ranks=[2, 5, 4, 8]), calibration=_batch(2, 56, 5))
    clone = copy.deepcopy(model)
    x, y = _batch(2, 56, 5)
    F.cross_entropy(clone(x), y).backward()
    assert all(l.token_grid is not None for _, l in factored_layers(clone))
    assert all(l.token_grid is None and l.warm_start_state() == [] for _, l in factored_layers(model))


def test_stale_three_mode_swin_rank_table_is_refused():
    x, y = _batch(2, 56, 5)
    names = find_targets(_swin())
    table = build_rank_table(_swin(), names, x, y, (0.5, 0.8))
    assert all(len(r) == 4 for rows in table.ranks for r in rows)
    budget = sum(max(row) for row in table.memory_bytes)
    inject(_swin(), WASIConfig(budget_bytes=budget, eps_set=(0.5, 0.8)), calibration=(x, y), rank_table=table)
    table.ranks = [[r[:3] for r in rows] for rows in table.ranks]  # as a table cached before 4-mode Swin inputs
    with pytest.raises(ValueError, match="rebuild the table"):
        inject(_swin(), WASIConfig(budget_bytes=budget, eps_set=(0.5, 0.8)), calibration=(x, y), rank_table=table)
