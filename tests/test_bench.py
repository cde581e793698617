"""experiments.bench end to end on the tiny CPU model (2 blocks): files, ratios against the reference,
hand-counted layer bytes, the held-memory breakdown, timing statistics and round-robin order."""
from __future__ import annotations

import ast
import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from experiments import bench
from experiments.builders.models import build_model
from tests.helpers import ROOT

SMALL = ["--model", "vit_tiny_cpu", "--batch", "4", "--set", "model.kwargs.depth=2", "hardware.threads=1"]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bench.main([*SMALL, "--eps", "0.6", "--measure", "cost", "time", "profile", "--warmup", "1", "--reps", "3",
                       "--out", str(tmp_path_factory.mktemp("bench"))])


@pytest.fixture(scope="module")
def table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "variants.csv").set_index("label")


def test_rows_and_ranks(table: pd.DataFrame) -> None:
    assert list(table.index) == ["vanilla", "wasi ε=0.6"]
    wasi = table.loc["wasi ε=0.6"]
    assert wasi.method == "wasi" and wasi.epsilon == 0.6
    assert len(json.loads(wasi.K)) == 4 and wasi.K_mean == sum(json.loads(wasi.K)) / 4  # 2 blocks x (fc1, fc2)
    assert [len(r) for r in json.loads(wasi.act_ranks)] == [3] * 4  # (B, N, I) modes
    image_cost = {"memory/activation_bytes", "memory/peak_bytes", "memory/weight_bytes", "flops/train_step",
                  "flops/inference_per_image"}  # bench.COST less the text model's sequence and per-layer keys
    assert image_cost <= set(bench.COST) and set(table.columns) >= {f"{key} ×" for key in image_cost} | {"layers ×"}


def test_ratios_are_the_reference_over_the_row() -> None:
    """On numbers worked by hand: `×` is the reference row's value over each row's; `layers ×` the dense over the
    compressed bytes of the converted layers; no reference row, no `<metric> ×` columns."""
    rows = pd.DataFrame({"label": ["vanilla", "wasi"], "flops/train_step": [12.0, 3.0], "memory/peak_bytes": [10, 4],
                         "memory/compressed_layers_bytes": [None, 5.0],
                         "memory/compressed_layers_vanilla_bytes": [None, 40.0]})
    table = bench.add_ratios(rows.copy(), "vanilla").set_index("label")
    assert table["flops/train_step ×"].tolist() == [1.0, 4.0] and table["memory/peak_bytes ×"].tolist() == [1.0, 2.5]
    assert table.loc["wasi", "layers ×"] == 8.0
    assert "flops/train_step ×" not in bench.add_ratios(rows.copy(), "absent")


def test_converted_layers_dense_bytes_match_a_hand_count(table: pd.DataFrame) -> None:
    model = build_model(bench.compose_cfg(["model=vit_tiny_cpu", "model.kwargs.depth=2"]).model, 10)
    t, (h, d) = model.patch_embed.num_patches + 1, model.blocks[0].mlp.fc1.weight.shape
    per_block = 4 * t * d + h * d + h + 4 * t * h + d * h + d  # dense x (B=4, T, I) + W + b of fc1 and fc2
    assert table.loc["wasi ε=0.6", "memory/compressed_layers_vanilla_bytes"] == 2 * per_block * 4


def test_held_memory_breakdown_adds_up_and_names_the_gelu_input(out: Path, table: pd.DataFrame) -> None:
    sources = pd.read_csv(out / "saved_tensors.csv").set_index("source")
    for label in table.index:
        assert sources[label].sum() == table.loc[label, "memory/activation_bytes"]
    model = build_model(bench.compose_cfg(["model=vit_tiny_cpu", "model.kwargs.depth=2"]).model, 10)
    t, h = model.patch_embed.num_patches + 1, model.blocks[0].mlp.fc1.out_features
    gelu_input = 2 * 4 * t * h * 4  # fc1's output (B, T, H) in float32, kept for GELU's backward, per block
    assert sources.loc["mlp.fc1 (Linear) / addmm", "vanilla"] == gelu_input


def test_timing_statistics_come_from_the_raw_times(out: Path) -> None:
    raw, stats = pd.read_csv(out / "timing_raw.csv"), pd.read_csv(out / "timing.csv")
    assert len(raw) == 2 * 3 * len(bench.PHASES)
    steps = raw.pivot_table(index=["label", "rep"], columns="phase", values="seconds")
    assert ((steps.forward + steps.backward + steps.optimizer - steps.train_step).abs() < 1e-12).all()
    median = {key: statistics.median(group.seconds) for key, group in raw.groupby(["label", "phase"])}
    for row in stats.itertuples():
        assert row.median_s == pytest.approx(median[row.label, row.phase], rel=1e-12)
        assert row.speedup == pytest.approx(median["vanilla", row.phase] / row.median_s, rel=1e-12)


def test_profile_counts_one_call_per_layer_and_step(out: Path) -> None:
    prof = pd.read_csv(out / "profile.csv").set_index(["label", "region"])
    for region in bench.REGIONS:  # 2 blocks x (fc1, fc2) WASI layers: one Tucker step, one gradient, one update each
        assert prof.loc[("wasi ε=0.6", region), "calls"] == 4
        assert prof.loc[("vanilla", region), "calls"] == 0 and prof.loc[("vanilla", region), "seconds"] == 0
    wasi = prof.loc["wasi ε=0.6"]
    assert 0 < wasi.loc[list(bench.REGIONS), "share"].sum() < 1  # inside the step, and not all of it
    for label in ("vanilla", "wasi ε=0.6"):  # the ops' own profile, a second one: its step against the regions'
        shaped, step = prof.loc[(label, bench.SHAPED_STEP)], prof.loc[(label, "step"), "seconds"]
        assert shaped.calls == 1 and shaped.seconds > 0 and shaped.share == pytest.approx(shaped.seconds / step)


def test_summary_and_plot(out: Path) -> None:
    text = (out / "summary.md").read_text()
    for needle in ("Weights: random init", "training images of dataset=shapes", "| vanilla ", "| wasi ε=0.6 ",
                   "K=[", "mlp.fc1 (Linear) / addmm",
                   "wasi ε=0.6: the ops with the most self time per step (their children excluded), from a second"):
        assert needle in text
    with Image.open(out / "latency.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert json.loads((out / "run.json").read_text())["reference"] == "vanilla"


def test_round_robin_order(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_step(model, optimizer, x, y, grad_clip, amp, clock) -> None:
        calls.append(model.label)
        for _ in range(3):
            clock()

    monkeypatch.setattr(bench, "train_step", fake_step)
    built = []
    for label in "abc":
        model = torch.nn.Identity()
        model.label = label
        method = SimpleNamespace(inference_model=lambda m: m)
        variant = SimpleNamespace(model=model, optimizer=None, method=method)
        built.append((bench.Spec(label, label, None, None, []), variant, bench.compose_cfg(["hardware=cpu"])))
    raw = bench.time_round_robin(built, torch.zeros(1), torch.zeros(1), torch.device("cpu"), warmup=1, reps=2)
    assert calls == list("abc" "bca" "cab")
    assert list(raw[raw.phase == "forward"].label) == list("bca" "cab")


def test_variants_sweep_epsilon_and_recompute_only_where_they_apply() -> None:
    args = bench.parse_args(["--model", "vit_tiny_cpu", "--methods", "vanilla", "wasi", "asi", "--eps", "0.5", "0.7"])
    specs = bench.variant_specs(args, bench.base_overrides(args))
    assert [s.label for s in specs] == ["vanilla", "wasi ε=0.5", "wasi ε=0.7", "asi ε=0.5", "asi ε=0.7"]
    cfg = bench.compose_cfg(specs[2].overrides)
    assert (cfg.method.epsilon, instantiate(cfg.method).config.epsilon_act, cfg.model.pretrained) == (0.7, 0.7, False)
    args = bench.parse_args(["--methods", "vanilla", "asi", "wasi", "--eps", "0.8",
                             "--recompute", "none", "mlp", "block"])
    specs = bench.variant_specs(args, bench.base_overrides(args))
    assert [s.label for s in specs] == ["vanilla [none]", "vanilla [block]", "asi ε=0.8 [none]", "asi ε=0.8 [block]",
                                        "wasi ε=0.8 [none]", "wasi ε=0.8 [mlp]", "wasi ε=0.8 [block]"]
    assert [instantiate(bench.compose_cfg(s.overrides).method).recompute for s in specs] == [
        "none", "block", "none", "block", "none", "mlp", "block"]
    args = bench.parse_args(["--methods", "vanilla", "wasi", "--eps", "0.8", "--recompute", "mlp", "attn", "block"])
    specs = bench.variant_specs(args, bench.base_overrides(args))  # the new rung: every method has attn
    assert [s.label for s in specs] == ["vanilla [none for mlp]", "vanilla [attn]", "vanilla [block]",
                                        "wasi ε=0.8 [mlp]", "wasi ε=0.8 [attn]", "wasi ε=0.8 [block]"]
    assert [instantiate(bench.compose_cfg(s.overrides).method).recompute for s in specs] == [
        "none", "attn", "block", "mlp", "attn", "block"]


def test_weights_line_names_a_model_configs_own_checkpoint(tmp_path: Path) -> None:
    out = bench.main(["--model", "vit_tiny_pretrained", "--methods", "vanilla", "--batch", "2", "--data", "digits",
                      "--set", "hardware.threads=1", "--out", str(tmp_path / "b")])
    assert "Weights: checkpoint checkpoints/vit_tiny_fractal.safetensors." in (out / "summary.md").read_text()
    out = bench.main(["--model", "vit_tiny_pretrained", "--methods", "wasi", "--eps", "0.8", "--batch", "2",
                      "--data", "digits", "--set", "hardware.threads=1", "method.epsilon_act=0.95",
                      "--out", str(tmp_path / "d")])  # --set may name a method's own keys
    assert pd.read_csv(out / "variants.csv").label.tolist() == ["wasi ε=0.8"]
    with pytest.raises(bench.BenchArgumentError, match="drop --spectrum pretrained"):  # cli: one line, exit 2
        bench.main(["--model", "vit_tiny_pretrained", "--spectrum", "pretrained", "--out", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()


def test_repeated_set_flags_add_up() -> None:
    args = bench.parse_args(["--set", "method.last_n=5", "seed=1", "--batch", "8", "--set", "model.pretrained=false"])
    assert args.set == ["method.last_n=5", "seed=1", "model.pretrained=false"]
    assert bench.parse_args([]).set == [] and bench.parse_args([]).set is not bench.parse_args([]).set


def test_pi_preset_sets_defaults_that_later_flags_override() -> None:
    args = bench.parse_args(["--preset", "pi", "--hardware", "cpu", "--batch", "8"])
    assert (args.hardware, args.measure, args.batch, str(args.out_root)) == ("cpu", ["time"], 8, "outputs/pi_latency")
    assert bench.parse_args(["--preset", "pi"]).hardware == "cpu_pi"
    assert bench.parse_args([]).hardware == "cpu" and bench.parse_args([]).measure == ["cost"]


def test_the_tool_composes_configs_on_its_own() -> None:
    """In a fresh interpreter (no test fixtures registering the config schemas first)."""
    probe = "from experiments import bench; print(bench.compose_cfg(['method=wasi', 'model=vit_b32']).method.name)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["wasi"], done.stderr[-2000:]


def test_speedup_over_flops_ratio_comes_from_the_table(table: pd.DataFrame) -> None:
    for row in table.itertuples():
        row = table.loc[row.Index]
        assert row["time/train_step_s × / flops ×"] == pytest.approx(
            row["time/train_step_s ×"] / row["flops/train_step ×"], rel=1e-12)
    assert table.loc["vanilla", "time/train_step_s × / flops ×"] == 1.0


def test_nearest_recompute_mode() -> None:
    assert bench.nearest_recompute("mlp", ("none", "attn", "block")) == "none"  # a tie goes to less recompute
    assert bench.nearest_recompute("attn", ("none", "block")) == "block"
    assert bench.nearest_recompute("block", ("none", "mlp", "attn", "block")) == "block"


def test_a_method_without_a_requested_mode_is_measured_with_its_nearest(tmp_path: Path) -> None:
    """`--methods vanilla wasi --recompute mlp` measured WASI alone: vanilla has no mlp. Now vanilla is measured
    with its nearest mode, none, labelled so, it is the reference, and the summary says what the row stands for."""
    args = bench.parse_args(["--model", "vit_tiny_cpu", "--methods", "vanilla", "wasi", "--eps", "0.6",
                             "--recompute", "mlp"])
    specs = bench.variant_specs(args, bench.base_overrides(args))
    assert [(s.label, s.recompute) for s in specs] == [("vanilla [none for mlp]", "none"), ("wasi ε=0.6 [mlp]", "mlp")]
    assert instantiate(bench.compose_cfg(specs[0].overrides).method).recompute == "none"
    out = bench.main([*SMALL, "--methods", "vanilla", "wasi", "--eps", "0.6", "--recompute", "mlp", "--out",
                      str(tmp_path)])
    table = pd.read_csv(out / "variants.csv").set_index("label")
    assert list(table.index) == ["vanilla [none for mlp]", "wasi ε=0.6 [mlp]"]
    assert table.loc["vanilla [none for mlp]", "flops/train_step ×"] == 1.0  # the reference
    text = (out / "summary.md").read_text()
    assert "Note: vanilla has no recompute=mlp; the row vanilla [none for mlp] stands for it" in text
    assert json.loads((out / "run.json").read_text())["notes"] == [
        "vanilla has no recompute=mlp; the row vanilla [none for mlp] stands for it (its nearest mode, none)"]
    args = bench.parse_args(["--model", "vit_tiny_cpu", "--methods", "vanilla", "--recompute", "none", "mlp"])
    (spec,) = bench.variant_specs(args, bench.base_overrides(args))  # its nearest mode is a row anyway
    assert spec.label == "vanilla [none]" and "stands for it" in spec.notes[0]


def test_compiled_rows_time_the_compiled_training_step(tmp_path: Path) -> None:
    args = bench.parse_args(["--model", "vit_tiny_cpu", "--methods", "vanilla", "wasi", "--eps", "0.6",
                             "--compile", "both"])
    specs = bench.variant_specs(args, bench.base_overrides(args))
    assert [(s.label, s.compiled) for s in specs] == [("vanilla", False), ("vanilla compiled", True),
                                                      ("wasi ε=0.6", False), ("wasi ε=0.6 compiled", True)]
    out = bench.main([*SMALL, "--methods", "wasi", "--eps", "0.6", "--measure", "time", "--compile", "on",
                      "--compile-backend", "eager", "--warmup", "1", "--reps", "1", "--out", str(tmp_path)])
    stats = pd.read_csv(out / "timing.csv")
    assert set(stats.label) == {"wasi ε=0.6"} and set(stats.phase) == set(bench.PHASES) - {"inference"}
    text = (out / "summary.md").read_text()
    assert "Compiled rows: the training model under torch.compile (backend eager)" in text


def test_profile_baseline_shows_before_and_after() -> None:
    rows = [{"label": "wasi", "region": r, "seconds": s, "calls": 1, "share": s / 2.0}
            for r, s in zip(("step", *bench.REGIONS), (2.0, 0.2, 0.02, 0.5))]
    after = pd.DataFrame(rows).assign(seconds=lambda d: d.seconds / 2, share=lambda d: d.share)
    cells = bench.profile_table(after, pd.DataFrame(rows))
    assert cells.loc["wasi", "wasi.factored_update"] == "500 ms (25.0%) → 250 ms (25.0%)"
    assert bench.profile_table(after).loc["wasi", "step"] == "1000 ms (100.0%)"


def test_ops_add_up_to_no_more_than_the_step(out: Path) -> None:
    """ops.csv: each variant's heaviest ops by self time, heaviest first, with their input shapes; self times
    exclude children, so together they are at most the step; WASI's include a matmul with a factor of rank K (on the
    CPU, oneDNN's linear: wasi.functional.factor_product)."""
    ops = pd.read_csv(out / "ops.csv", keep_default_na=False)
    step = pd.read_csv(out / "profile.csv").set_index(["label", "region"]).seconds
    for label, rows in ops.groupby("label"):
        assert 0 < len(rows) <= bench.TOP_OPS
        assert list(rows.seconds) == sorted(rows.seconds, reverse=True)
        assert 0 < rows.seconds.sum() <= step[label, bench.SHAPED_STEP] * (1 + 1e-9)
        assert rows.share.to_numpy() == pytest.approx((rows.seconds / step[label, bench.SHAPED_STEP]).to_numpy())
    ranks = set(ast.literal_eval(pd.read_csv(out / "variants.csv").set_index("label").loc["wasi ε=0.6", "K"]))
    wasi = ops[(ops.label == "wasi ε=0.6") & ops.op.isin(["aten::mm", "aten::addmm", "mkldnn::_linear_pointwise"])]
    assert any(f", {k}]" in shapes or f"[{k}," in shapes for shapes in wasi.shapes for k in ranks)
