"""Today's memory-saving peers as methods, each through its own library: VeLoRA (PEFT's LoRA variant), LoRA-FA
(PEFT's optimizer), GaLore (galore-torch); and block recompute on LoRA. What they hold is checked against hand
counts from the shapes: the activations each keeps for backward, GaLore's projected optimizer state."""
from __future__ import annotations

import contextlib
import functools

import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

import wasi
from experiments import bench
from experiments.builders.methods import Galore, Lora, LoraFa, Velora
from experiments.configuration.schema import ConfigError, validate
from experiments.measurement import metrics
from tests.helpers import QUICK, SHAPES, sweep_results, train

DEVICE = torch.device("cpu")
ADAMW = functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0)
F32 = 4
D, HIDDEN, DEPTH = 96, 384, 2  # the tiny ViT below: width, MLP width, blocks


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                             embed_dim=D, num_heads=3, depth=DEPTH)


def batch(b: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)


def built(method, optimizer=ADAMW, seed: int = 0):
    model = tiny_vit(seed)
    method.apply(model, [batch()], DEVICE)
    return model, method.build_optimizer(model, optimizer)


def step(model: nn.Module, optimizer: torch.optim.Optimizer, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    return bench.train_step(model, optimizer, *data, 2.0, contextlib.nullcontext()).item()


# ---------------------------------------------------------------------------------------------
# What each peer holds, against hand counts
# ---------------------------------------------------------------------------------------------

def test_velora_and_lora_fa_drop_the_adapter_inputs_lora_holds():
    """LoRA's A keeps its layer's input x: (T, I) for its gradient; VeLoRA keeps (T, num_groups) instead; LoRA-FA
    (A frozen) keeps nothing of it. Everything else a step holds is the same, so the differences are exact."""
    x, y = batch()
    held = {}
    for method in (Lora(), Velora(num_groups=32), LoraFa()):
        model, optimizer = built(method)
        step(model, optimizer, (x, y))  # VeLoRA sets its projection on the first training batch
        held[type(method).__name__] = metrics.activation_bytes(lambda m=model: F.cross_entropy(m(x), y), model)
    tokens = len(x) * (tiny_vit().patch_embed.num_patches + 1)
    inputs = DEPTH * (D + HIDDEN)  # per token: fc1's input (D) and fc2's (HIDDEN), in every block
    assert held["Lora"] - held["Velora"] == F32 * tokens * (inputs - DEPTH * 2 * 32)
    assert held["Lora"] - held["LoraFa"] == F32 * tokens * inputs


def test_velora_layers_are_pefts_variant_and_merge_as_lora():
    method = Velora(num_groups=32, scale=0.1, init_type="batch_average_once")
    model, optimizer = built(method)
    fc1 = model.blocks[0].mlp.fc1
    assert fc1.lora_velora_num_groups["default"] == 32 and fc1.lora_velora_scale["default"] == 0.1
    assert fc1.lora_velora_embed["default"].shape == (D // 32,) and not fc1.lora_velora_initialized["default"]
    step(model, optimizer, batch())
    embed = fc1.lora_velora_embed["default"].clone()
    assert fc1.lora_velora_initialized["default"] and torch.linalg.vector_norm(embed) == pytest.approx(1.0)
    step(model, optimizer, batch(seed=2))
    assert torch.equal(fc1.lora_velora_embed["default"], embed)  # batch_average_once: set by the first batch only
    merged = method.inference_model(model)
    x = batch(seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_lora_fa_freezes_a_trains_b_and_holds_adam_state_for_b_and_the_head_only():
    model, optimizer = built(LoraFa(r=8, alpha=16))
    assert type(optimizer).__name__ == "LoraFAOptimizer"
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_B." in n or n.startswith("head.") for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(model, optimizer, batch())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == names  # A stays at its random init
    b_elements = DEPTH * (HIDDEN * 8 + D * 8)  # B: (O, r) of fc1 and fc2 per block
    head = D * 10 + 10
    assert metrics.weight_bytes(model, optimizer) == F32 * 4 * (b_elements + head)  # param, grad, exp_avg(_sq)


def projected_elements(o: int, i: int, rank: int) -> int:
    """GaLore's state for W: (O, I) with proj_type std: Adam's two moments of the projected gradient (max x rank
    each) and the projection onto the smaller side's top `rank` singular vectors. galore-torch keeps that
    projection as a slice of the SVD's factor (U[:, :rank] or Vh[:rank]), so the whole min x min factor stays
    allocated: that is what the process holds, and what storage counting sees."""
    return min(o, i) ** 2 + 2 * rank * max(o, i)


def test_galore_state_is_the_projection_and_low_rank_moments():
    method = Galore(rank=4, targets="mlp+attn", train_rest=True)
    model, optimizer = built(method)
    assert type(optimizer).__module__.startswith("galore_torch")
    step(model, optimizer, batch())
    params = list(model.parameters())
    assert all(p.requires_grad for p in params)  # full fine-tuning
    projected = [model.get_submodule(n).weight for n in method.projected_names(model)]
    assert len(projected) == 4 * DEPTH
    for p in projected:  # the projection in use is rank x min, a view of the min x min SVD factor
        ortho = optimizer.state[p]["projector"].ortho_matrix
        assert sorted(ortho.shape) == [4, min(p.shape)] and ortho.untyped_storage().nbytes() == F32 * min(p.shape) ** 2
    ids = {id(p) for p in projected}
    state = sum(projected_elements(*p.shape, 4) for p in projected)
    state += 2 * sum(p.numel() for p in params if id(p) not in ids)  # plain Adam moments elsewhere
    total = sum(p.numel() for p in params)
    assert metrics.weight_bytes(model, optimizer) == F32 * (2 * total + state)  # params, dense grads, state
    # The CPU peak starts from what is resident: parameters, buffers, grads and the whole optimizer state.
    buffers = sum(b.numel() for b in model.buffers())
    assert metrics.peak_bytes(lambda: None, DEVICE, model, optimizer) == F32 * (2 * total + state + buffers)


def test_galore_resumes_from_a_checkpoint_as_if_never_stopped(tmp_path):
    """Its state holds galore_torch's GaLoreProjector objects; checkpoints are read back with weights_only=True."""
    model, optimizer = built(Galore(rank=4))
    step(model, optimizer, batch())
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "last.ckpt")
    resumed, again = built(Galore(rank=4), seed=5)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    resumed.load_state_dict(saved["model"])
    again.load_state_dict(saved["optimizer"])
    for m, opt in ((model, optimizer), (resumed, again)):
        step(m, opt, batch(seed=2))
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_galore_moves_every_weight_and_the_rank_bounds_the_projected_update():
    model, optimizer = built(Galore(rank=2, targets="mlp", scale=1.0, update_proj_gap=100))
    w = model.blocks[0].mlp.fc1.weight
    before = w.detach().clone()
    step(model, optimizer, batch())
    assert torch.linalg.matrix_rank(w.detach() - before).item() <= 2  # the first Adam step stays in the subspace


@pytest.mark.parametrize("make", [Lora, Velora, LoraFa, Galore], ids=lambda m: m.__name__)
def test_block_recompute_trains_exactly_as_without(make):
    """recompute=block (activation checkpointing) composes with every peer: the same weights after two steps."""
    runs = []
    for recompute in ("none", "block"):
        model, optimizer = built(make(recompute=recompute))
        assert all(wasi.recompute.is_checkpointed(b) for b in model.blocks) == (recompute == "block")
        for seed in (1, 2):
            step(model, optimizer, batch(seed=seed))
        runs.append(model.state_dict())
    for key in runs[0]:
        torch.testing.assert_close(runs[1][key], runs[0][key], rtol=1e-5, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------
# Configs: schema, optimizer, the benchmark and train.py
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, builds", [("lora_fa", "PEFT's LoRA-FA optimizer"),
                                            ("galore", "galore_torch.GaLoreAdamW")])
def test_peers_built_on_adamw_refuse_another_optimizer(make_cfg, method, builds):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(f"method={method}"))  # the default optimizer is sgd
    assert str(err.value) == (f"optimizer._target_=torch.optim.SGD: method={method} trains with {builds}, built from "
                              "the adamw settings. Fix: optimizer=adamw")
    validate(make_cfg(f"method={method}", "optimizer=adamw"))
    with pytest.raises(ValueError, match=f"method={method} trains with .* so it needs optimizer=adamw"):
        built(instantiate(make_cfg(f"method={method}").method), functools.partial(torch.optim.SGD, lr=0.1))


@pytest.mark.parametrize("overrides, message", [
    (["method=velora", "method.num_groups=0"], "method.num_groups=0: must be an int >= 1. Fix: method.num_groups=32"),
    (["method=velora", "method.init_type=mean"], "method.init_type=mean: must be one of batch_average_once, "),
    (["method=velora", "method.scale=0"], "method.scale=0.0: must be a number > 0. Fix: method.scale=0.1"),
    (["method=galore", "optimizer=adamw", "method.rank=0"], "method.rank=0: must be an int >= 1. Fix: method.rank=4"),
    (["method=galore", "optimizer=adamw", "method.proj_type=up"], "method.proj_type=up: must be one of std, "),
    (["method=galore", "optimizer=adamw", "method.update_proj_gap=0"], "method.update_proj_gap=0: must be an int"),
    (["method=lora_fa", "optimizer=adamw", "method.r=0"], "method.r=0: must be an int >= 1. Fix: method.r=8"),
])
def test_peer_settings_are_checked(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*overrides))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_configs_are_the_authors_fine_tuning_recipes(make_cfg):
    velora = instantiate(make_cfg("method=velora").method)
    assert (velora.num_groups, velora.scale, velora.init_type, velora.r, velora.alpha) == (
        32, 0.1, "batch_average_once", 8, 16)
    galore = instantiate(make_cfg("method=galore", "optimizer=adamw").method)
    assert (galore.rank, galore.scale, galore.update_proj_gap, galore.proj_type, galore.targets,
            galore.train_rest) == (4, 4.0, 500, "std", "mlp+attn", True)
    lora_fa = instantiate(make_cfg("method=lora_fa", "optimizer=adamw").method)
    assert (lora_fa.r, lora_fa.alpha) == (8, 16)


@pytest.mark.slow  # make test-slow
def test_bench_gives_the_adamw_peers_their_optimizer_and_measures_them(tmp_path):
    args = bench.parse_args(["--model", "vit_tiny_cpu", "--methods", "vanilla", "lora", "velora", "lora_fa", "galore",
                             "--recompute", "none", "block"])
    specs = bench.variant_specs(args, bench.base_overrides(args))
    assert [s.label for s in specs][:4] == ["vanilla [none]", "vanilla [block]", "lora [none]", "lora [block]"]
    optimizers = {s.label: bench.compose_cfg(s.overrides).optimizer._target_ for s in specs}
    assert optimizers["galore [block]"] == optimizers["lora_fa [none]"] == "torch.optim.AdamW"
    assert optimizers["lora [block]"] == optimizers["velora [none]"] == "torch.optim.SGD"
    chosen = bench.parse_args(["--methods", "galore", "--set", "optimizer=adamw", "optimizer.lr=1e-4"])
    spec = bench.variant_specs(chosen, bench.base_overrides(chosen))[0]
    assert bench.compose_cfg(spec.overrides).optimizer.lr == 1e-4

    out = bench.main(["--model", "vit_tiny_cpu", "--batch", "4", "--set", "model.kwargs.depth=2", "hardware.threads=1",
                      "--methods", "vanilla", "lora", "velora", "lora_fa", "galore", "--out", str(tmp_path / "b")])
    table = pd.read_csv(out / "variants.csv").set_index("label")
    assert table.optimizer.to_dict() == {"vanilla": "SGD", "lora": "SGD", "velora": "SGD",
                                         "lora_fa": "peft.LoraFAOptimizer", "galore": "galore_torch.AdamW"}
    act = table["memory/activation_bytes"]
    assert act["lora_fa"] < act["velora"] < act["lora"] < act["vanilla"] == act["galore"]
    assert table.loc["galore", "memory/weight_bytes"] > table.loc["lora", "memory/weight_bytes"]


@pytest.mark.slow  # a subprocess run of its own; make test-slow
def test_every_peer_trains_in_a_train_py_run(tmp_path):
    """`train.py -m method=velora,lora_fa,galore optimizer=adamw`, a few steps each, every metric written."""
    sweep = tmp_path / "sweep"
    train("-m", *QUICK, *SHAPES, "logger.mode=disabled", "optimizer=adamw", "method=velora,lora_fa,galore",
          f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path}/cache")
    results = sweep_results(sweep)
    assert [r["method"] for r in results] == ["velora", "lora_fa", "galore"]
    for r in results:
        assert r["train/steps"] == 6 and 0 <= r["test/acc"] <= 1 and r["memory/peak_bytes"] > 0
        assert r["flops/train_step"] > 3 * r["flops/inference_per_image"]
    assert results[0]["method/velora/num_groups"] == 32 and results[2]["method/galore/rank"] == 4
    assert results[1]["params/trainable"] < results[0]["params/trainable"]  # LoRA-FA trains B, not A
