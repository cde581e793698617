"""Methods as config-instantiated objects: vanilla, PEFT LoRA, SVD-LLM init, the subspace methods' pass-through to
wasi.WASIConfig, and pretraining's parameter groups, on a tiny timm ViT (width 48, MLP hidden 192, 5 classes)."""
import functools
import logging
import math

import hydra
import pytest
import torch
from torch import nn

import wasi
from experiments.builders.methods import Lora, Pretrain, Subspace, SvdLlm, Vanilla
from tests import tiny_models
from wasi import svd_llm

DEVICE = torch.device("cpu")
WIDTH, HIDDEN = 48, 192


def tiny_vit(seed: int = 0) -> nn.Module:
    return tiny_models.vit(seed)


def batches(n: int = 3, b: int = 8):
    return tiny_models.batches(32, n=n, batch=b)


def trainable(model: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def test_vanilla_trains_everything_or_from_the_last_targets_on():
    model = tiny_vit()
    Vanilla().apply(model, batches(), DEVICE)
    assert set(trainable(model)) == {n for n, _ in model.named_parameters()}
    model = tiny_vit()
    Vanilla(last_n=1).apply(model, batches(), DEVICE)  # train_rest: everything after the last block's first target
    last_mlp = {f"blocks.1.mlp.{f}.{p}" for f in ("fc1", "fc2") for p in ("weight", "bias")}
    assert set(trainable(model)) == last_mlp | {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    model = tiny_vit()
    Vanilla(last_n=1, train_rest=False).apply(model, batches(), DEVICE)
    assert set(trainable(model)) == last_mlp | {"head.weight", "head.bias"}


def test_every_method_trains_the_rest_densely_on_request():
    """train_rest=True: LoRA and SVD-LLM keep their frozen base weights, everything else trains."""
    model = tiny_vit()
    Lora(r=4, alpha=8, train_rest=True).apply(model, batches(), DEVICE)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"blocks.{b}.mlp.{fc}.base_layer.{t}"
                      for b in (0, 1) for fc in ("fc1", "fc2") for t in ("weight", "bias")}
    model = tiny_vit()
    SvdLlm(finetune="factors", train_rest=True, calib_samples=8).apply(model, batches(), DEVICE)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", [Vanilla, Lora, SvdLlm])
def test_block_recompute_checkpoints_every_block_and_mlp_is_refused(method):
    model = tiny_vit()
    method(recompute="block").apply(model, batches(), DEVICE)
    assert all(wasi.recompute.is_checkpointed(block) for block in model.blocks)
    with pytest.raises(ValueError, match="recompute=mlp needs the low-rank layers of wsi or wasi"):
        method(recompute="mlp")


@pytest.mark.parametrize("method", [Vanilla, Lora, SvdLlm])
def test_attn_recompute_checkpoints_every_attention_and_the_config_accepts_it(method, make_cfg):
    from experiments.configuration.schema import validate

    model = tiny_vit()
    method(recompute="attn").apply(model, batches(), DEVICE)
    assert all(wasi.recompute.is_checkpointed(block.attn) for block in model.blocks)
    assert not any(wasi.recompute.is_checkpointed(block) for block in model.blocks)
    name = {Vanilla: "vanilla", Lora: "lora", SvdLlm: "svd_llm"}[method]
    validate(make_cfg(f"method={name}", "method.recompute=attn"))


def test_subspace_recompute_modes_follow_the_weight():
    assert Subspace("wasi", weight=True, activation=True).recomputes == ("none", "mlp", "attn", "block")
    assert Subspace("asi", weight=False, activation=True).recomputes == ("none", "attn", "block")
    assert Vanilla.recomputes == ("none", "attn", "block")


def test_lora_trains_only_adapters_and_head_with_hand_counted_params():
    model = tiny_vit()
    Lora(r=8, alpha=16).apply(model, batches(), DEVICE)
    params = trainable(model)
    assert all("lora_" in n or n.startswith("head.") for n in params)
    # per block: fc1 (48 -> 192) and fc2 (192 -> 48), each adapter r (I + O); head 48*5 + 5
    assert sum(params.values()) == 2 * 2 * 8 * (WIDTH + HIDDEN) + WIDTH * tiny_models.CLASSES + tiny_models.CLASSES


def test_lora_merged_model_equals_adapted_model():
    model = tiny_vit()
    method = Lora(r=4, alpha=8)
    method.apply(model, batches(), DEVICE)
    with torch.no_grad():  # make the adapters non-trivial (PEFT initialises B = 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    merged = method.inference_model(model)
    x = batches(1)[0][0]
    model.eval(), merged.eval()
    torch.testing.assert_close(merged(x), model(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged.blocks[0].mlp.fc1.base_layer.weight, model.blocks[0].mlp.fc1.base_layer.weight)


@pytest.mark.parametrize("finetune", ["lora", "factors"])
def test_svd_llm_equal_size_uses_wasi_rank_and_caches_whitening(tmp_path, caplog, finetune):
    reference = tiny_vit()
    ranks = {n: svd_llm.rank_from_epsilon(reference.get_submodule(n).weight, 0.6)
             for n in wasi.find_targets(reference)}
    wsi = tiny_vit()
    summary = wasi.inject(wsi, wasi.WASIConfig(activation=False, epsilon=0.6), calibration=batches(1)[0])
    assert {s["name"]: s["weight_rank"] for s in summary.to_dict()["layers"]} == ranks

    cache = tmp_path / "whitening.safetensors"
    model = tiny_vit()
    out = SvdLlm(epsilon=0.6, calib_samples=16, finetune=finetune, cache=str(cache)).apply(model, batches(), DEVICE)
    assert out["svd_llm/rank"] == ranks and cache.is_file()
    for name, k in ranks.items():
        down, up = model.get_submodule(name)
        assert down.in_features == reference.get_submodule(name).in_features and down.out_features == k
    params = trainable(model)
    if finetune == "factors":
        factors = {f"{n}.{j}.{w}" for n in ranks for j, w in ((0, "weight"), (1, "weight"), (1, "bias"))}
        assert set(params) == factors | {"head.weight", "head.bias"}
    else:
        assert all("lora_" in n or n.startswith("head.") for n in params)

    # The same weights and images reuse the cached whitening; other images (or weights) recompute it.
    name = next(iter(ranks))
    with caplog.at_level(logging.INFO, logger="experiments.builders.methods"):
        again = tiny_vit()
        SvdLlm(epsilon=0.6, calib_samples=16, finetune=finetune, cache=str(cache)).apply(again, batches(), DEVICE)
        assert "reusing SVD-LLM whitening" in caplog.text
        torch.testing.assert_close(again.get_submodule(name)[0].weight, model.get_submodule(name)[0].weight)
        caplog.clear()
        other = tiny_vit()
        SvdLlm(epsilon=0.6, calib_samples=16, finetune=finetune, cache=str(cache)).apply(
            other, batches(2, 4)[::-1], DEVICE)
        assert "reusing" not in caplog.text
    assert not torch.allclose(other.get_submodule(name)[0].weight, model.get_submodule(name)[0].weight)


def test_svd_llm_factors_do_not_depend_on_the_calibration_size():
    """The whitening comes from the mean xᵀx: the same images twice give the same W_u and W_v. (From the sum,
    W_u would grow and W_v shrink by n^¼, which made LoRA on the two factors diverge on `shapes`.)"""
    once, twice = tiny_vit(), tiny_vit()
    data = batches(1)
    SvdLlm(epsilon=0.6, calib_samples=8, finetune="factors").apply(once, data, DEVICE)
    SvdLlm(epsilon=0.6, calib_samples=16, finetune="factors").apply(twice, data * 2, DEVICE)
    for name in wasi.find_targets(tiny_vit()):
        for j in (0, 1):
            torch.testing.assert_close(twice.get_submodule(name)[j].weight, once.get_submodule(name)[j].weight)


def test_svd_llm_ratio_gives_formula_rank():
    model = tiny_vit()
    out = SvdLlm(ratio=0.25, calib_samples=8, finetune="factors").apply(model, batches(), DEVICE)
    assert set(out["svd_llm/rank"].values()) == {WIDTH * HIDDEN * 25 // (100 * (WIDTH + HIDDEN))}


def test_svd_llm_rejects_bad_options():
    with pytest.raises(ValueError, match="method.finetune=full: must be one of lora, factors"):
        SvdLlm(finetune="full")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rho must be in"):  # the library's check, when the rank is computed
        SvdLlm(ratio=1.5, calib_samples=8).apply(tiny_vit(), batches(), DEVICE)


def test_subspace_options_are_wasi_configs_fields():
    """Every option reaches wasi.WASIConfig as given (its defaults otherwise); budget_mib becomes its bytes."""
    method = Subspace(name="wsi", weight=True, activation=False, epsilon=0.6, targets="mlp+attn", last_n=2,
                      weight_update="reference", seed=7)
    assert method.config == wasi.WASIConfig(weight=True, activation=False, epsilon=0.6, targets="mlp+attn", last_n=2,
                                            weight_update="reference", seed=7)
    assert (method.targets, method.last_n, method.train_rest, method.recompute) == ("mlp+attn", 2, False, "mlp")
    assert Subspace(name="wasi", budget_mib=1.5).config.budget_bytes == 1.5 * 2**20
    with pytest.raises(wasi.WASIConfigError, match=r"epsilon=2.0: must be in \(0, 1\]"):
        Subspace(name="wasi", epsilon=2.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'epsilonn'"):
        Subspace(name="wasi", epsilonn=0.5)


@pytest.mark.parametrize("basis", ["qr", "nearest"])
def test_the_method_s_basis_is_the_optimizer_s(make_cfg, basis):
    cfg = make_cfg("method=wasi", f"method.basis={basis}")
    method = hydra.utils.instantiate(cfg.method)
    model = tiny_vit()
    method.apply(model, batches(), DEVICE)
    assert method.build_optimizer(model, hydra.utils.instantiate(cfg.optimizer)).basis == basis


def test_pretraining_decays_only_matrices_and_clips_as_torch_does():
    model = tiny_vit()
    optimizer = Pretrain().build_optimizer(model, functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05))
    decayed, plain = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and names[id(p)] != "pos_embed" for p in decayed["params"])
    assert {names[id(p)] for p in plain["params"]} >= {"pos_embed", "blocks.0.norm1.weight", "head.bias"}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    def norm() -> float:  # in float64, over every gradient
        return math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))

    before = norm()
    assert float(Pretrain.clip_grad_norm_(model, 1e-3)) == pytest.approx(before, rel=1e-5) and before > 1e-3
    assert norm() == pytest.approx(1e-3, rel=1e-4)


def test_budget_rank_table_is_built_once_and_reused(tmp_path, monkeypatch):
    table = tmp_path / "rank_table.json"

    def apply() -> dict:
        method = Subspace(name="wasi", weight=True, activation=True, budget_mib=1.0, rank_table=str(table))
        return method.apply(tiny_vit(), batches(1), DEVICE)

    first = apply()
    assert table.is_file()
    monkeypatch.setattr(wasi.model, "build_rank_table", lambda *a, **k: pytest.fail("the saved table was not reused"))
    assert apply()["layers"] == first["layers"]
