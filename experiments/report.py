"""Sweep report: one Markdown table and a few PNG plots from a directory of ``results.json``.

Usage::

    python -m experiments.report multirun/2025-01-01 [--out DIR] [--latency timing.csv]
                                 [--wandb-project ENTITY/PROJECT]

Every ``results.json`` below the sweep directory (Hydra multirun layout
``<date>/<time>/<job>/results.json``) is one flat JSON object of metrics plus a nested
``config``. A summary averages the seeds of each configuration (test accuracy as mean ± std) and is
printed on the terminal too and written with every metric's mean, in the runs' own units, to ``summary.csv``; the
table of runs shows every metric in readable units (accuracy in %,
memory in MiB, FLOPs in GFLOPs or MFLOPs, times in ms; the unit is in each header); missing keys are
left blank, and a value that should be a number but is not (text) is shown as it is in the table and left out
of the summary and the plots. A job folder (it has ``.hydra/``) without ``results.json`` is listed as failed,
with the last error line of its ``train.log``; so is a folder whose ``results.json`` cannot be read. The report
is regenerated from the files each time. A sweep folder that does not exist ends with one line and exit status 2
(nothing is created).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

log = logging.getLogger(__name__)

Run = dict[str, Any]

#: Table columns, in order; metric keys found in the runs but not listed here follow them.
COLUMNS: tuple[str, ...] = (
    "method",
    "model",
    "dataset",
    "epsilon",
    "val/acc",
    "test/acc",
    "flops/inference_per_image",
    "flops/inference_per_sequence",
    "flops/train_step",
    "flops/layers_train_step",
    "memory/activation_bytes",
    "memory/weight_bytes",
    "memory/peak_bytes",
    "memory/compressed_layers_bytes",
    "time/train_step_s",
)

#: Where a key missing from the top level of results.json is looked up in its ``config``.
CONFIG_FALLBACK: dict[str, tuple[str, ...]] = {
    "method": ("method", "name"),
    "model": ("model", "name"),
    "dataset": ("dataset", "name"),
    "epsilon": ("method", "epsilon"),
    "epsilon_act": ("method", "epsilon_act"),
    "recompute": ("method", "recompute"),
    "train_rest": ("method", "train_rest"),
    "seed": ("seed",),
}

#: The summary: one row per configuration (the GROUP_KEYS that vary across runs), seeds averaged.
GROUP_KEYS: tuple[str, ...] = ("dataset", "model", "method", "epsilon", "epsilon_act", "recompute", "train_rest")
SUMMARY: tuple[str, ...] = ("test/acc", "params/trainable", "memory/activation_bytes", "memory/peak_bytes",
                            "flops/train_step", "time/train_step_s")


#: Top-level key groups left out of the table (run settings and provenance, not results).
HIDDEN_GROUPS: frozenset[str] = frozenset({"config", "versions", "machine", "method"})


@dataclass(frozen=True)
class Unit:
    """How a metric is shown: value × ``scale`` with ``decimals`` digits, ``label`` in the header."""

    label: str
    scale: float
    decimals: int

    def show(self, x: float) -> str:
        return f"{x * self.scale:.{self.decimals}f}"


PERCENT, MIB, MS = Unit("%", 100, 1), Unit("MiB", 2**-20, 1), Unit("ms", 1000, 2)
GFLOPS, MFLOPS = Unit("GFLOPs", 1e-9, 2), Unit("MFLOPs", 1e-6, 2)
#: Metric key endings and the unit they are shown in; ``flops/*`` take GFLOPs or MFLOPs by size.
SUFFIX_UNITS: tuple[tuple[str, Unit], ...] = (("/acc", PERCENT), ("_bytes", MIB), ("_s", MS))


def unit(key: str, values: Iterable[Any] = ()) -> Unit | None:
    """The unit ``key`` is shown in (None: as it is). ``values``: the column, for FLOPs' prefix."""
    if key.startswith("flops/"):
        return GFLOPS if max((v for v in values if _is_number(v)), default=0) >= 1e9 else MFLOPS
    return next((u for suffix, u in SUFFIX_UNITS if key.endswith(suffix)), None)


def header(key: str, u: Unit | None) -> str:
    """``memory/peak_bytes`` -> ``memory/peak (MiB)``; ``test/acc`` -> ``test/acc (%)``."""
    return key if u is None else f"{stem(key)} ({u.label})"


def stem(key: str) -> str:
    """The key without a unit suffix: ``memory/peak_bytes`` -> ``memory/peak``."""
    return next((key[: -len(s)] for s in ("_bytes", "_s") if key.endswith(s)), key)


def _from_config(run: Run, path: tuple[str, ...]) -> Any:
    """``run["config"][a][b]`` (nested, as W&B stores it) or ``run["config/a.b"]`` (flattened)."""
    flat = run.get("config/" + ".".join(path))
    if flat is not None:
        return flat
    node = run.get("config")
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


#: Keys whose effective value a run records at the top level (the config may leave them to the library).
EFFECTIVE: dict[str, str] = {"recompute": "method/recompute"}


def value(run: Run, key: str) -> Any:
    """The run's value for ``key``: top level first, then the config fallback, else None."""
    for top in (EFFECTIVE.get(key), key):
        if top is not None and run.get(top) is not None:
            return run[top]
    path = CONFIG_FALLBACK.get(key)
    return _from_config(run, path) if path else None


def _natural_key(path: Path) -> list[tuple[int, int | str]]:
    """Sort key putting Hydra job folders in numeric order (2 before 10)."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in path.parts]


def read_results(path: Path) -> Run | str:
    """The run of one ``results.json`` (a JSON object), or why it cannot be read."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"results.json cannot be read ({type(err).__name__}: {err})"
    if not isinstance(data, dict):
        return f"results.json holds a JSON {type(data).__name__}, not an object of metrics"
    return data


def find_results(sweep_dir: Path) -> list[Run]:
    """Load every readable ``results.json`` below ``sweep_dir``; adds ``run`` (its folder, relative). The
    unreadable ones are skipped here and listed by :func:`find_failed`."""
    runs = []
    for path in sorted(sweep_dir.rglob("results.json"), key=_natural_key):
        data = read_results(path)
        if isinstance(data, str):
            log.warning("%s: %s; listed as failed", path, data)
            continue
        data["run"] = str(path.parent.relative_to(sweep_dir))
        runs.append(data)
    log.info("found %d results.json under %s", len(runs), sweep_dir)
    return runs


def find_failed(sweep_dir: Path) -> list[dict[str, str]]:
    """Job folders below ``sweep_dir`` whose results are missing or unreadable: ``run`` (the folder, relative)
    and ``error``: why results.json cannot be read, or else the last error line of its ``train.log`` (a job
    folder holds ``.hydra/``)."""
    jobs = {h.parent for h in sweep_dir.rglob(".hydra")} | {r.parent for r in sweep_dir.rglob("results.json")}
    failed = []
    for job in sorted(jobs, key=_natural_key):
        results = job / "results.json"
        if not results.is_file():
            failed.append({"run": str(job.relative_to(sweep_dir)), "error": last_error(job / "train.log")})
        elif isinstance(reason := read_results(results), str):
            failed.append({"run": str(job.relative_to(sweep_dir)), "error": reason})
    return failed


def last_error(log_file: Path) -> str:
    """The message of the last ERROR record in a Hydra job log (train.py logs a failure's one-line summary
    there, then its traceback)."""
    if not log_file.is_file():
        return "no train.log"
    errors = [line.split("][ERROR] - ", 1)[1] for line in log_file.read_text(errors="replace").splitlines()
              if "][ERROR] - " in line]
    return errors[-1] if errors else "no error logged (still running, or killed)"


def wandb_runs(project: str) -> list[Run]:
    """Runs of a W&B project as flat dicts (summary metrics + ``config``); [] when unreachable."""
    try:
        import wandb

        api_runs = list(wandb.Api(timeout=20).runs(project))
    except Exception as err:  # offline, no credentials, unknown project: the report goes on
        log.warning("W&B project %s not read: %s", project, err)
        return []
    runs = []
    for api_run in api_runs:
        data = {k: v for k, v in api_run.summary.items() if not k.startswith("_")}
        data["config"] = dict(api_run.config)
        data["run"] = f"wandb:{api_run.id}"
        runs.append(data)
    log.info("read %d runs from W&B project %s", len(runs), project)
    return runs


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def number(run: Run, key: str) -> float | None:
    """The run's value for ``key`` if it is a number; None otherwise (missing, or text where a number belongs:
    the table shows it, the summary and the plots leave it out)."""
    x = value(run, key)
    return x if _is_number(x) else None


def warn_text_metrics(runs: Iterable[Run]) -> None:
    """One warning per summary metric that holds text instead of a number."""
    for run in runs:
        for key in SUMMARY:
            if (x := value(run, key)) is not None and not _is_number(x):
                log.warning("run %s: %s is %r, not a number; left out of the summary and the plots",
                            run.get("run", "?"), key, x)


def table_columns(runs: Iterable[Run]) -> list[str]:
    """``run``, the fixed COLUMNS, then other scalar metric keys (not HIDDEN_GROUPS) sorted."""
    extra = set()
    for run in runs:
        extra |= {k for k, v in run.items() if (_is_number(v) or isinstance(v, str))
                  and not ("/" in k and k.split("/")[0] in HIDDEN_GROUPS)}
    extra -= set(COLUMNS) | {"run"}
    return ["run", *COLUMNS, *sorted(extra)]


def format_cell(x: Any, u: Unit | None = None) -> str:
    """A number in unit ``u`` (else ints in full, floats to 4 significant digits), None blank."""
    if x is None:
        return ""
    if _is_number(x) and u is not None:
        return u.show(x)
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    return str(x).replace("|", "\\|")


def markdown_table(runs: list[Run]) -> str:
    """One row per run, columns from :func:`table_columns`, each in its unit (:func:`unit`)."""
    columns = table_columns(runs)
    cells = {}
    for key in columns:
        values = [value(run, key) for run in runs]
        u = unit(key, values)
        cells[header(key, u)] = [format_cell(v, u) for v in values]
    table = pd.DataFrame(cells, columns=list(cells))
    numeric = [all(c == "" or _looks_numeric(c) for c in table[h]) and table[h].ne("").any() for h in table]
    return table.to_markdown(index=False, disable_numparse=True,
                             colalign=["right" if n else "left" for n in numeric])


def _looks_numeric(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


#: Top-level key groups whose numbers the summary CSV averages (every metric a run reports).
METRIC_GROUPS: tuple[str, ...] = ("val", "test", "train", "params", "flops", "memory", "time")


def summary_frame(runs: list[Run]) -> pd.DataFrame:
    """One row per configuration (the GROUP_KEYS whose values differ across runs): those keys, the number of runs
    (seeds), and for every numeric metric of METRIC_GROUPS its mean over the runs, with the standard deviation of
    val/acc and test/acc (`<key> std`, NaN for one run). Numbers in the runs' own units (bytes, FLOPs, seconds,
    accuracy in [0, 1]); written as summary.csv."""
    by = _varying(runs, GROUP_KEYS) or ["method"]
    keys = sorted({k for r in runs for k in r if k.split("/")[0] in METRIC_GROUPS and number(r, k) is not None})
    keys = [k for k in SUMMARY if k in keys] + [k for k in keys if k not in SUMMARY]
    frame = pd.DataFrame([{**{k: format_cell(value(r, k)) for k in by}, **{k: number(r, k) for k in keys}}
                          for r in runs], columns=[*by, *keys])
    rows = []
    for group_keys, group in frame.groupby(by, sort=False):
        row: dict[str, Any] = dict(zip(by, group_keys if isinstance(group_keys, tuple) else (group_keys,)))
        row["runs"] = len(group)
        for key in keys:
            row[key] = group[key].astype(float).mean()
            if key in ("val/acc", "test/acc"):
                row[f"{key} std"] = group[key].astype(float).std()
        rows.append(row)
    return pd.DataFrame(rows)


def summary_table(runs: list[Run]) -> str:
    """`summary_frame`'s SUMMARY columns in the metrics' units: test accuracy as mean ± standard deviation over
    the seeds of each configuration, the mean of the other SUMMARY metrics (deterministic ones are equal across
    seeds)."""
    by = _varying(runs, GROUP_KEYS) or ["method"]
    frame = summary_frame(runs)
    rows = []
    for _, stats in frame.iterrows():
        row = {k: stats[k] for k in by}
        row["runs"] = str(stats["runs"])
        mean, std = stats.get("test/acc"), stats.get("test/acc std")
        row[header("test/acc", PERCENT)] = "" if mean is None or pd.isna(mean) else (
            f"{mean * PERCENT.scale:.1f}" + ("" if std is None or pd.isna(std) else f" ± {std * PERCENT.scale:.1f}"))
        for key in SUMMARY[1:]:
            mean = stats.get(key)
            mean = None if mean is None or pd.isna(mean) else float(mean)
            u = unit(key, [mean] if mean is not None else [])
            counted = key.startswith("params/") and mean is not None
            row[header(key, u)] = f"{mean:,.0f}" if counted else format_cell(mean, u)
        rows.append(row)
    return pd.DataFrame(rows).fillna("").to_markdown(index=False, disable_numparse=True)  # missing cells: blank


def failed_table(failed: list[dict[str, str]]) -> str:
    return pd.DataFrame(failed, columns=["run", "error"]).to_markdown(index=False, disable_numparse=True)


def _series_label(run: Run, vary: list[str]) -> str:
    parts = [str(value(run, "method"))]
    parts += [str(value(run, k)) for k in vary]
    return " / ".join(parts)


def _varying(runs: list[Run], keys: Iterable[str]) -> list[str]:
    return [k for k in keys if len({str(value(r, k)) for r in runs}) > 1]


def _training_memory(run: Run) -> Any:
    act, weight = value(run, "memory/activation_bytes"), value(run, "memory/weight_bytes")
    return act + weight if _is_number(act) and _is_number(weight) else None


def _scale_axis(ax: plt.Axes, axis: str, values: list[float]) -> None:
    """Log scale when ``values`` span more than a decade, else linear; plain tick labels (``20``, ``50``,
    ``100``) on a few major ticks only, so they never crowd."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) > 10 * min(positive):
        getattr(ax, f"set_{axis}scale")("log")
        target = getattr(ax, f"{axis}axis")
        target.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        target.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        target.set_minor_formatter(ticker.NullFormatter())
    else:
        getattr(ax, f"{axis}axis").set_major_locator(ticker.MaxNLocator(nbins=5))


def plot_accuracy_vs_memory(runs: list[Run], path: Path) -> bool:
    """Test accuracy against training memory (saved activations + weights, gradients, optimizer state)
    and against measured peak memory, both in MiB."""
    vary = _varying(runs, ("model", "dataset"))
    panels: list[tuple[str, str, Callable[[Run], Any]]] = [
        ("training memory (MiB)", "saved activations + weights, gradients, optimizer state", _training_memory),
        ("peak memory (MiB)", "measured over one training step", lambda r: value(r, "memory/peak_bytes")),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    drawn = False
    for ax, (xlabel, title, get_x) in zip(axes, panels):
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for run in runs:
            x, y = get_x(run), value(run, "test/acc")
            if _is_number(x) and _is_number(y) and x > 0:
                series[_series_label(run, vary)].append((MIB.scale * x, PERCENT.scale * y))
        for label, points in sorted(series.items()):
            ax.scatter(*zip(*points), label=label, s=28)
            drawn = True
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        if series:
            _scale_axis(ax, "x", [x for points in series.values() for x, _ in points])
            ax.legend(fontsize=7)
    return _save(fig, path, drawn)


def _plot_vs_epsilon(runs: list[Run], keys: list[str], path: Path) -> bool:
    """One panel per key, in its unit: mean value per (series, ε) as lines; runs without ε as dashed lines."""
    vary = _varying(runs, ("model", "dataset"))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.2), squeeze=False)
    drawn = False
    for ax, key in zip(axes[0], keys):
        u = unit(key, [value(r, key) for r in runs]) or Unit("", 1, 0)
        points: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        flat: dict[str, list[float]] = defaultdict(list)
        for run in runs:
            y, eps = value(run, key), value(run, "epsilon")
            if not _is_number(y):
                continue
            if _is_number(eps):
                points[_series_label(run, vary)][float(eps)].append(u.scale * y)
            else:
                flat[_series_label(run, vary)].append(u.scale * y)
        for label, by_eps in sorted(points.items()):
            eps_sorted = sorted(by_eps)
            ax.plot(eps_sorted, [sum(by_eps[e]) / len(by_eps[e]) for e in eps_sorted], "o-",
                    label=label)
            drawn = True
        for label, ys in sorted(flat.items()):
            ax.axhline(sum(ys) / len(ys), linestyle="--", color="gray" if len(flat) == 1 else None,
                       label=label)
            drawn = True
        ax.set_title(stem(key))
        ax.set_xlabel("ε (explained variance)")
        ax.set_ylabel(u.label)
        ax.grid(alpha=0.3)
        if points or flat:
            ys = [y for by_eps in points.values() for v in by_eps.values() for y in v]
            _scale_axis(ax, "y", ys + [y for v in flat.values() for y in v])
            ax.legend(fontsize=7)
    return _save(fig, path, drawn)


def read_latency_summary(path: Path) -> list[dict[str, str]]:
    """Rows of a timing.csv written by ``experiments.bench --measure time`` (or ``make pi-latency``)."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def plot_latency_ratios(rows: list[dict[str, str]], path: Path) -> bool:
    """Speed-up vs the benchmark's reference (vanilla) per variant, for the training step and for inference."""
    phases = ("train_step", "inference")
    labels = list(dict.fromkeys(r["label"] for r in rows))
    ratio = {(r["label"], r["phase"]): float(r["speedup"] or "nan") for r in rows}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels)), 4.2))
    width = 0.8 / len(phases)
    for i, phase in enumerate(phases):
        xs = [j + (i - (len(phases) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [ratio.get((lab, phase), math.nan) for lab in labels], width, label=phase)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("speed-up vs vanilla (median ratio)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path, bool(labels))


def _save(fig: plt.Figure, path: Path, drawn: bool) -> bool:
    if drawn:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        log.info("wrote %s", path)
    else:
        log.info("no data for %s, not written", path.name)
    plt.close(fig)
    return drawn


def write_report(runs: list[Run], out: Path, latency: Path | None = None,
                 failed: list[dict[str, str]] | None = None) -> list[Path]:
    """Write ``report.md`` and the plots into ``out``; returns the files written. ``failed``: jobs
    without results (:func:`find_failed`), listed with their errors."""
    out.mkdir(parents=True, exist_ok=True)
    failed = failed or []
    plots: list[tuple[str, str, Callable[[Path], bool]]] = [
        ("accuracy_vs_memory.png", "Test accuracy vs training memory",
         lambda p: plot_accuracy_vs_memory(runs, p)),
        ("flops_vs_eps.png", "FLOPs vs ε",
         lambda p: _plot_vs_epsilon(runs, ["flops/inference_per_image", "flops/train_step"], p)),
        ("memory_vs_eps.png", "Memory vs ε",
         lambda p: _plot_vs_epsilon(runs, ["memory/activation_bytes", "memory/weight_bytes",
                                           "memory/peak_bytes"], p)),
    ]
    if latency is not None:
        rows = read_latency_summary(latency)
        plots.append(("latency_ratios.png", "On-device latency (speed-up vs vanilla)",
                      lambda p: plot_latency_ratios(rows, p)))
    written = []
    counts = f"{len(runs)} runs" + (f", {len(failed)} failed (below)" if failed else "")
    sections = [f"# Sweep report\n\n{counts}.\n\n## Summary\n\n{summary_table(runs)}\n" if runs else
                f"# Sweep report\n\n{counts}.\n",
                f"## Runs\n\n{markdown_table(runs)}\n"]
    if failed:
        sections.append(f"## Failed jobs\n\n{failed_table(failed)}\n")
    for name, title, draw in plots:
        if draw(out / name):
            written.append(out / name)
            sections.append(f"## {title}\n\n![{title}]({name})\n")
    if latency is not None:
        sections.append(f"Latency summary: `{latency}`\n")
    (out / "report.md").write_text("\n".join(sections))
    if runs:
        summary_frame(runs).to_csv(out / "summary.csv", index=False)
        written.insert(0, out / "summary.csv")
    return [out / "report.md", *written]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="directory searched for results.json")
    parser.add_argument("--out", type=Path, default=None, help="default: <sweep_dir>/report")
    parser.add_argument("--latency", type=Path, default=None, help="timing.csv of experiments.bench / make pi-latency")
    parser.add_argument("--wandb-project", default=None, help="also read runs from W&B")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.sweep_dir.is_dir():
        stop(f"{args.sweep_dir} is not a folder. Fix: pass a sweep folder, e.g. multirun/<date>/<time>")
    if args.latency is not None and not args.latency.is_file():
        stop(f"--latency {args.latency}: there is no such file. Fix: --latency <the timing.csv of experiments.bench>")
    runs, failed = find_results(args.sweep_dir), find_failed(args.sweep_dir)
    if args.wandb_project:
        runs += wandb_runs(args.wandb_project)
    warn_text_metrics(runs)
    out = args.out or args.sweep_dir / "report"
    written = write_report(runs, out, args.latency, failed)
    if runs:
        print(summary_table(runs))
    print("\n".join(str(path) for path in written))


def stop(line: str) -> None:
    """A wrong argument: one line on stderr, exit status 2."""
    print(f"error: {line}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
