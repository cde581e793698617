"""experiments.report on a hand-written Hydra multirun tree of results.json files."""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from experiments import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _runs() -> list[dict]:
    runs = [{
        "method": "vanilla", "model": "vit_b32", "dataset": "cifar10",
        "val/acc": 0.9125, "test/acc": 0.90375,
        "flops/inference_per_image": 8_727_183_360, "flops/train_step": 3_351_238_000_640,
        "memory/activation_bytes": 1_207_959_552, "memory/weight_bytes": 339_738_624,
        "memory/peak_bytes": 2_147_483_648, "time/train_step_s": 1.2345678901234,
        "config": {"method": {"name": "vanilla"}, "seed": 0},
    }]
    for i, eps in enumerate((0.4, 0.6, 0.8)):
        runs.append({
            "method": "wasi", "model": "vit_b32", "dataset": "cifar10", "epsilon": eps,
            "val/acc": 0.8 + 0.03 * i + 1e-7, "test/acc": 0.79 + 0.031 * i,
            "flops/inference_per_image": 4_000_000_000 + 10**9 * i,
            "flops/train_step": 1_500_000_000_000 + 3 * 10**11 * i,
            "memory/activation_bytes": 20_000_000 * (i + 1),
            "memory/weight_bytes": 5_000_000 * (i + 1),
            "memory/peak_bytes": 900_000_000 + i, "memory/compressed_layers_bytes": 123_457 * i,
            "time/train_step_s": 0.7 + i / 3,
            "config": {"method": {"name": "wasi", "epsilon": eps}},
        })
    # Runs that state method and ε only in their config (nested as W&B keeps it, or flattened
    # as train.py writes it) and lack most metrics.
    runs.append({"val/acc": 0.5, "config": {"method": {"name": "asi", "epsilon": 0.9}}})
    runs.append({"val/acc": 0.625, "params/trainable": 12345, "config/method.name": "wsi",
                 "config/method.epsilon": 0.5, "versions/torch": "2.5", "method/layers": 4})
    return runs


@pytest.fixture()
def sweep(tmp_path: Path) -> tuple[Path, list[dict]]:
    runs = _runs()
    for job, run in enumerate(runs):
        folder = tmp_path / "multirun" / "2025-01-01" / "12-00-00" / str(job)
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(run))
    (tmp_path / "multirun" / "2025-01-01" / "12-00-00" / "multirun.yaml").write_text("x: 1\n")
    return tmp_path / "multirun", runs


def _parse_table(md: str) -> list[dict[str, str]]:
    lines = [l for l in md.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in l.strip("|").split("|")))) for l in lines[2:]]


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_table_numbers_equal_inputs(sweep: tuple[Path, list[dict]], tmp_path: Path) -> None:
    root, runs = sweep
    out = tmp_path / "out"
    report.main([str(root), "--out", str(out)])
    rows = _parse_table((out / "report.md").read_text())
    assert len(rows) == len(runs)
    by_run = {row["run"]: row for row in rows}
    for job, run in enumerate(runs):
        row = by_run[f"2025-01-01/12-00-00/{job}"]
        for key, expected in run.items():
            if key.split("/")[0] in ("config", "versions", "method") and key != "method":
                assert key not in row, key
                continue
            if isinstance(expected, str):
                assert row[key] == expected
            elif isinstance(expected, int):
                assert int(row[key]) == expected, key
            else:
                assert float(row[key]) == expected, key
        for key in report.COLUMNS:
            if key not in run and key not in ("method", "epsilon"):
                assert row[key] == "", key
    asi, wsi = by_run["2025-01-01/12-00-00/4"], by_run["2025-01-01/12-00-00/5"]
    assert asi["method"] == "asi" and float(asi["epsilon"]) == 0.9
    assert wsi["method"] == "wsi" and float(wsi["epsilon"]) == 0.5
    assert asi["params/trainable"] == ""


def test_plots_are_valid_pngs(sweep: tuple[Path, list[dict]], tmp_path: Path) -> None:
    root, _ = sweep
    latency = tmp_path / "summary.csv"
    fields = ["label", "method", "epsilon", "phase", "speedup_vs_vanilla"]
    with latency.open("w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for label, eps, ratio in (("vanilla", "", 1.0), ("wasi@0.4", "0.4", 1.5)):
            for phase in ("forward", "train_step", "inference"):
                writer.writerow({"label": label, "method": label.split("@")[0], "epsilon": eps,
                                 "phase": phase, "speedup_vs_vanilla": ratio})
    written = report.write_report(report.find_results(root), tmp_path / "out", latency)
    names = {p.name for p in written}
    assert names == {"report.md", "accuracy_vs_memory.png", "flops_vs_eps.png",
                     "memory_vs_eps.png", "latency_ratios.png"}
    md = (tmp_path / "out" / "report.md").read_text()
    for path in written:
        if path.suffix == ".png":
            _assert_png(path)
            assert f"]({path.name})" in md


def test_empty_sweep_writes_table_only(tmp_path: Path) -> None:
    written = report.write_report(report.find_results(tmp_path), tmp_path / "out")
    assert [p.name for p in written] == ["report.md"]
    assert "0 runs" in written[0].read_text()


def test_jobs_in_numeric_order(tmp_path: Path) -> None:
    for job in (10, 2, 1):
        folder = tmp_path / "multirun" / "d" / "t" / str(job)
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"method": "vanilla", "val/acc": job / 100}))
    runs = report.find_results(tmp_path / "multirun")
    assert [r["run"] for r in runs] == ["d/t/1", "d/t/2", "d/t/10"]


def test_wandb_runs_flattened_and_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeRun:
        id, config = "abc123", {"method": {"name": "wasi", "epsilon": 0.7}}
        summary = {"val/acc": 0.75, "_step": 9, "memory/peak_bytes": 1024}

    class FakeApi:
        def __init__(self, timeout: int) -> None:
            pass

        def runs(self, project: str) -> list[FakeRun]:
            if project != "team/wasi":
                raise ValueError("no such project")
            return [FakeRun()]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=FakeApi))
    (run,) = report.wandb_runs("team/wasi")
    assert run["run"] == "wandb:abc123" and "_step" not in run
    assert report.value(run, "epsilon") == 0.7 and report.value(run, "method") == "wasi"
    assert report.value(run, "memory/peak_bytes") == 1024
    assert report.wandb_runs("other/project") == []
