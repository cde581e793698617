"""experiments.report on a hand-written Hydra multirun tree of results.json files."""

from __future__ import annotations

import csv
import json
import statistics
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
    """The first Markdown table in md."""
    lines = []
    for line in md.splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in l.strip("|").split("|")))) for l in lines[2:]]


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_table_shows_each_metric_in_its_unit(sweep: tuple[Path, list[dict]], tmp_path: Path) -> None:
    root, runs = sweep
    out = tmp_path / "out"
    report.main([str(root), "--out", str(out)])
    rows = _parse_table((out / "report.md").read_text().split("## Runs")[1])
    assert len(rows) == len(runs)
    by_run = {row["run"]: row for row in rows}
    vanilla, wasi_06 = by_run["2025-01-01/12-00-00/0"], by_run["2025-01-01/12-00-00/2"]
    # Worked by hand from the inputs above.
    assert (vanilla["val/acc (%)"], vanilla["test/acc (%)"]) == ("91.2", "90.4")  # 0.9125 -> 91.25 rounds half-even
    assert vanilla["flops/inference_per_image (GFLOPs)"] == "8.73" and vanilla["flops/train_step (GFLOPs)"] == "3351.24"
    assert vanilla["memory/activation (MiB)"] == "1152.0" and vanilla["memory/weight (MiB)"] == "324.0"
    assert vanilla["memory/peak (MiB)"] == "2048.0" and vanilla["time/train_step (ms)"] == "1234.57"
    assert wasi_06["memory/activation (MiB)"] == "38.1" and wasi_06["memory/compressed_layers (MiB)"] == "0.1"
    assert wasi_06["epsilon"] == "0.6" and wasi_06["test/acc (%)"] == "82.1"
    assert vanilla["memory/compressed_layers (MiB)"] == "" and vanilla["epsilon"] == ""
    # Every other cell: the input in the column's unit, or as it is (strings, counts).
    scale = {"(%)": (100, 1), "(MiB)": (2**-20, 1), "(GFLOPs)": (1e-9, 2), "(ms)": (1000, 2)}
    for job, run in enumerate(runs):
        row = by_run[f"2025-01-01/12-00-00/{job}"]
        assert not any(h.split("/")[0] in ("config", "versions") or h.startswith("method/") for h in row)
        for h, cell in row.items():
            key = h.split(" (")[0]
            unit = h[len(key) + 1:]
            raw = next((run[k] for k in (key, key + "_bytes", key + "_s") if k in run), None)
            if unit in scale and raw is not None:
                factor, digits = scale[unit]
                assert cell == f"{raw * factor:.{digits}f}", (job, h)
            elif isinstance(raw, (int, str)):
                assert cell == str(raw), (job, h)
    asi, wsi = by_run["2025-01-01/12-00-00/4"], by_run["2025-01-01/12-00-00/5"]
    assert asi["method"] == "asi" and asi["epsilon"] == "0.9"
    assert wsi["method"] == "wsi" and wsi["epsilon"] == "0.5" and wsi["params/trainable"] == "12345"


def test_small_flop_counts_are_in_mflops_and_unitless_floats_keep_4_digits() -> None:
    runs = [{"run": "0", "flops/inference_per_image": 61_230_000, "train/loss": 2.3843445777893066},
            {"run": "1", "flops/inference_per_image": 5e8, "train/loss": 0.000123456}]
    rows = _parse_table(report.markdown_table(runs))
    assert [r["flops/inference_per_image (MFLOPs)"] for r in rows] == ["61.23", "500.00"]
    assert [r["train/loss"] for r in rows] == ["2.384", "0.0001235"]


def test_failed_jobs_are_listed_with_their_last_error(sweep: tuple[Path, list[dict]], tmp_path: Path) -> None:
    root, runs = sweep
    sweep_dir = root / "2025-01-01" / "12-00-00"
    for job, log in ((6, "[t][experiments.training.errors][ERROR] - trainer.grad_clip=-1.0: must be a number > 0. "
                         "Fix: x\n"
                         "Traceback (most recent call last):\n  File ...\nConfigError: trainer.grad_clip=-1.0\n"),
                     (7, "[t][experiments.run][INFO] - epoch 1 step 3\n")):
        (sweep_dir / str(job) / ".hydra").mkdir(parents=True)
        (sweep_dir / str(job) / "train.log").write_text(log)
    (sweep_dir / "0" / ".hydra").mkdir()  # a job with results is not failed
    out = tmp_path / "out"
    report.main([str(root), "--out", str(out)])
    md = (out / "report.md").read_text()
    assert f"{len(runs)} runs, 2 failed" in md
    failed = _parse_table(md.split("## Failed jobs")[1])
    assert failed == [
        {"run": "2025-01-01/12-00-00/6", "error": "trainer.grad_clip=-1.0: must be a number > 0. Fix: x"},
        {"run": "2025-01-01/12-00-00/7", "error": "no error logged (still running, or killed)"}]


def test_accuracy_vs_memory_plots_mib_with_tick_labels_apart(sweep: tuple[Path, list[dict]], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path, drawn: figures.append(fig) or drawn)
    assert report.plot_accuracy_vs_memory(report.find_results(sweep[0]), tmp_path / "a.png")
    (fig,) = figures
    fig.canvas.draw()
    left, right = fig.axes
    assert left.get_xlabel() == "training memory (MiB)" and right.get_xlabel() == "peak memory (MiB)"
    assert left.get_ylabel() == right.get_ylabel() == "test accuracy (%)"
    xs = [x for collection in right.collections for x, _ in collection.get_offsets()]
    assert min(xs) == pytest.approx(900_000_000 / 2**20) and max(xs) == pytest.approx(2048)
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        boxes = sorted((t.get_window_extent(renderer) for t in ax.get_xticklabels(which="both")
                        if t.get_visible() and t.get_text() and lo <= t.get_position()[0] <= hi), key=lambda b: b.x0)
        assert len(boxes) >= 2
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))  # no two labels overlap
        assert all("e" not in t.get_text() for t in ax.get_xticklabels(which="both"))  # plain numbers, no 1e9


def test_plots_are_valid_pngs(sweep: tuple[Path, list[dict]], tmp_path: Path) -> None:
    root, _ = sweep
    latency = tmp_path / "timing.csv"  # as experiments.bench --measure time writes it
    fields = ["label", "phase", "n", "median_s", "iqr_s", "speedup"]
    with latency.open("w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for label, ratio in (("vanilla", 1.0), ("wasi ε=0.4", 1.5)):
            for phase in ("forward", "train_step", "inference"):
                writer.writerow({"label": label, "phase": phase, "n": 3, "median_s": 0.1 / ratio, "iqr_s": 0.01,
                                 "speedup": ratio})
    written = report.write_report(report.find_results(root), tmp_path / "out", latency)
    names = {p.name for p in written}
    assert names == {"report.md", "summary.csv", "accuracy_vs_memory.png", "flops_vs_eps.png",
                     "memory_vs_eps.png", "latency_ratios.png"}
    md = (tmp_path / "out" / "report.md").read_text()
    with open(tmp_path / "out" / "summary.csv", newline="") as f:  # report.md's summary, in the metrics' own units
        rows = list(csv.DictReader(f))
    table = _parse_table(md.split("## Summary")[1].split("## Runs")[0])
    assert [r["method"] for r in rows] == [r["method"] for r in table] and len(rows) >= 2
    for row, shown in zip(rows, table):
        mean = row["test/acc"] and f"{float(row['test/acc']) * 100:.1f}"  # blank: a configuration without one
        assert shown["test/acc (%)"].split(" ±")[0] == mean
    for path in written:
        if path.suffix == ".png":
            _assert_png(path)
            assert f"]({path.name})" in md


def test_summary_averages_seeds_of_each_configuration(tmp_path: Path) -> None:
    accs = {("vanilla", 0): 0.91, ("vanilla", 1): 0.93, ("vanilla", 2): 0.95, ("wasi", 0): 0.90, ("wasi", 1): 0.94}
    for job, ((method, seed), acc) in enumerate(accs.items()):
        folder = tmp_path / "sweep" / str(job)
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({
            "method": method, "model": "vit_tiny", "dataset": "digits", "test/acc": acc, "config/seed": seed,
            "memory/peak_bytes": 3 * 2**20 if method == "vanilla" else 2**20, "params/trainable": 1000,
            "config/method.recompute": "none" if method == "vanilla" else None,  # the library's default: ...
            **({"method/recompute": "mlp"} if method == "wasi" else {})}))       # ... as the run resolved it
    rows = _parse_table(report.summary_table(report.find_results(tmp_path / "sweep")))
    assert [(r["method"], r["recompute"], r["runs"]) for r in rows] == [("vanilla", "none", "3"), ("wasi", "mlp", "2")]
    assert rows[0]["params/trainable"] == "1,000"
    vanilla = [100 * a for (m, _), a in accs.items() if m == "vanilla"]
    assert rows[0]["test/acc (%)"] == f"{statistics.mean(vanilla):.1f} ± {statistics.stdev(vanilla):.1f}"
    assert (rows[0]["memory/peak (MiB)"], rows[1]["memory/peak (MiB)"]) == ("3.0", "1.0")
    report.write_report(report.find_results(tmp_path / "sweep"), tmp_path / "out")
    csv_rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))  # the same numbers, in their own units
    assert [(r["method"], r["runs"]) for r in csv_rows] == [("vanilla", "3"), ("wasi", "2")]
    assert float(csv_rows[0]["test/acc"]) == pytest.approx(statistics.mean(vanilla) / 100)
    assert float(csv_rows[0]["test/acc std"]) == pytest.approx(statistics.stdev(vanilla) / 100)
    assert float(csv_rows[0]["memory/peak_bytes"]) == 3 * 2**20 and float(csv_rows[1]["params/trainable"]) == 1000


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


def test_report_of_a_real_sweep(method_sweep: Path, tmp_path: Path) -> None:
    """The session's six-method train.py sweep: every job in the summary, none failed, every plot drawn."""
    written = report.write_report(report.find_results(method_sweep), tmp_path, failed=report.find_failed(method_sweep))
    rows = _parse_table((tmp_path / "report.md").read_text().split("## Summary")[1])
    assert [r["method"] for r in rows] == ["vanilla", "lora", "svd_llm", "wsi", "asi", "wasi"]
    assert all(r["runs"] == "1" and float(r["memory/peak (MiB)"]) > 0 for r in rows)
    assert report.find_failed(method_sweep) == []
    assert sorted(p.name for p in written) == ["accuracy_vs_memory.png", "flops_vs_eps.png", "memory_vs_eps.png",
                                               "report.md", "summary.csv"]
