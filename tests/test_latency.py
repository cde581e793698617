"""device.latency on a tiny ViT: timing phases, interleaving, aggregation and output files."""

from __future__ import annotations

import csv
import statistics
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from device import latency
from experiments.methods import Subspace, Vanilla

LAST_N = 4  # both blocks' fc1 and fc2


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             depth=2, num_classes=10)


def _variants(x: torch.Tensor, y: torch.Tensor) -> list[latency.Variant]:
    sgd, cpu = partial(torch.optim.SGD, lr=1e-3), torch.device("cpu")
    wasi_method = Subspace(name="wasi", weight=True, activation=True, epsilon=0.8,
                           epsilon_act=0.8, last_n=LAST_N)
    return [
        latency.build_variant("vanilla", "vanilla", None, _tiny_vit(), Vanilla(last_n=LAST_N),
                              sgd, (x, y), cpu),
        latency.build_variant("wasi@0.8", "wasi", 0.8, _tiny_vit(), wasi_method, sgd, (x, y), cpu),
    ]


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[latency.Variant]]:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    variants = _variants(x, y)
    out = tmp_path_factory.mktemp("latency")
    latency.benchmark(variants, x, y, out, warmup=1, reps=2, device=torch.device("cpu"),
                      settings={"model": "tiny vit"})
    return out, variants


def test_same_trainable_modules(bench: tuple[Path, list[latency.Variant]]) -> None:
    _, variants = bench

    def trainable_modules(model: torch.nn.Module) -> set[str]:
        return {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}

    vanilla, wasi_v = (trainable_modules(v.model) for v in variants)
    assert vanilla == wasi_v == {"blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1",
                                 "blocks.1.mlp.fc2", "head"}


def test_raw_rows(bench: tuple[Path, list[latency.Variant]]) -> None:
    out, _ = bench
    columns, rows = _read(out / "raw.csv")
    assert tuple(columns) == latency.RAW_COLUMNS
    assert len(rows) == 2 * 2 * len(latency.PHASES)
    by_key = {(r["label"], r["rep"], r["phase"]): float(r["seconds"]) for r in rows}
    for label in ("vanilla", "wasi@0.8"):
        for rep in ("0", "1"):
            parts = [by_key[label, rep, p] for p in ("forward", "backward", "optimizer")]
            assert all(s > 0 for s in parts) and by_key[label, rep, "inference"] > 0
            assert by_key[label, rep, "train_step"] == pytest.approx(sum(parts), rel=1e-12)
    assert {r["epsilon"] for r in rows if r["label"] == "vanilla"} == {""}
    assert {float(r["epsilon"]) for r in rows if r["label"] == "wasi@0.8"} == {0.8}


def test_summary_ratios_from_raw(bench: tuple[Path, list[latency.Variant]]) -> None:
    out, _ = bench
    _, raw = _read(out / "raw.csv")
    columns, summary = _read(out / "summary.csv")
    assert tuple(columns) == latency.SUMMARY_COLUMNS
    assert len(summary) == 2 * len(latency.PHASES)

    def median(label: str, phase: str) -> float:
        return statistics.median(float(r["seconds"]) for r in raw
                                 if r["label"] == label and r["phase"] == phase)

    for row in summary:
        vals = [float(r["seconds"]) for r in raw
                if r["label"] == row["label"] and r["phase"] == row["phase"]]
        assert int(row["n"]) == 2
        assert float(row["median_s"]) == pytest.approx(median(row["label"], row["phase"]))
        assert float(row["min_s"]) == min(vals) and float(row["max_s"]) == max(vals)
        assert min(vals) <= float(row["q1_s"]) <= float(row["q3_s"]) <= max(vals)
        expected = median("vanilla", row["phase"]) / median(row["label"], row["phase"])
        assert float(row["speedup_vs_vanilla"]) == pytest.approx(expected, rel=1e-12)


def test_markdown_and_plot(bench: tuple[Path, list[latency.Variant]]) -> None:
    out, _ = bench
    text = (out / "summary.md").read_text()
    for needle in ("torch_threads: 1", f"torch: {torch.__version__}", "| vanilla |", "| wasi@0.8 |",
                   "mean K"):
        assert needle in text
    png = out / "latency.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert (out / "run.json").stat().st_size > 0


def test_round_robin_order(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_step(v: latency.Variant, *_: object) -> dict[str, float]:
        calls.append(v.label)
        return {"forward": 1.0, "backward": 2.0, "optimizer": 3.0}

    monkeypatch.setattr(latency, "time_train_step", fake_step)
    monkeypatch.setattr(latency, "time_inference", lambda *_: 0.5)
    variants = [latency.Variant(lab, lab, None, torch.nn.Identity(), None, torch.nn.Identity())
                for lab in "abc"]
    rows = latency.run_interleaved(variants, torch.zeros(1), torch.zeros(1), warmup=1, reps=2,
                                   device=torch.device("cpu"))
    assert calls == list("abc" "bca" "cab")
    assert [r["label"] for r in rows if r["phase"] == "forward"] == list("bca" "cab")
    assert {r["seconds"] for r in rows if r["phase"] == "train_step"} == {6.0}


def test_cli_small(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = latency.main(["--model", "vit_tiny_cpu", "--batch", "2", "--threads", "1",
                        "--epsilons", "0.5", "--methods", "vanilla", "wasi", "--last-n", "2",
                        "--warmup", "1", "--reps", "1", "--out", str(tmp_path / "cli")])
    for name in ("raw.csv", "summary.csv", "summary.md", "latency.png", "run.json"):
        assert (out / name).stat().st_size > 0
    _, summary = _read(out / "summary.csv")
    assert {r["label"] for r in summary} == {"vanilla", "wasi@0.5"}
    assert "last_n: 2" in (out / "summary.md").read_text()


def test_method_configs_sweep_only_where_eps_matters() -> None:
    args = latency.parse_args(["--model", "vit_tiny_cpu", "--methods", "vanilla", "wasi", "asi",
                               "--epsilons", "0.5", "0.7"])
    specs = latency.method_configs(args, ["model=vit_tiny_cpu"], last_n=3)
    assert [s[0] for s in specs] == ["vanilla", "wasi@0.5", "wasi@0.7", "asi@0.5", "asi@0.7"]
    wasi_cfg = specs[2][3].method
    assert (wasi_cfg.epsilon, wasi_cfg.epsilon_act, wasi_cfg.last_n) == (0.7, 0.7, 3)
    assert specs[0][3].method.last_n == 3

    args = latency.parse_args(["--methods", "wasi", "asi", "--epsilons", "0.5", "--act-ranks", "2",
                               "8", "16"])
    specs = latency.method_configs(args, ["model=vit_tiny_cpu"], last_n=2)
    assert [s[0] for s in specs] == ["wasi@0.5", "asi"]
    for _, _, _, cfg in specs:
        assert list(cfg.method.ranks) == [2, 8, 16] and cfg.method.epsilon_act is None
