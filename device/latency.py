"""On-device latency: one training step (forward, backward, optimizer) and inference, per method.

Every method variant (vanilla, and each subspace method at each ε) is built from the project's
Hydra configs (``conf/model``, ``conf/method``, ``conf/hardware``, ``conf/optimizer``) and all of
them are timed in one process, interleaved round-robin (repetition r of every variant, then
r + 1, starting one variant later each round), so a slow spell of the machine hits every
variant alike and the ratios stay meaningful. Outputs, under ``--out``:

- ``raw.csv``: label, method, epsilon, rep, phase, seconds (one row per variant x rep x phase);
- ``summary.csv``: label, method, epsilon, phase, n, median_s, q1_s, q3_s, min_s, max_s,
  speedup_vs_vanilla (median of vanilla / median of the variant, same phase);
- ``summary.md``: environment, settings, per-variant ranks and the timing table;
- ``latency.png``; ``run.json`` (environment, settings, injection summaries).

Phases: ``forward`` (model + loss), ``backward``, ``optimizer`` (step, with the subspace
update of factored layers, and zero_grad), ``train_step`` (their sum per repetition) and
``inference`` (``model.eval()``, ``torch.no_grad()``, one batch).

Examples::

    python -m device.latency               # Pi 5 profile: ViT-B/32, batch 128, vanilla + WASI at each ε
    python -m device.latency --batch 8 --reps 3 --warmup 1 --threads 1 --last-n 4 --hardware cpu
    python -m device.latency --model swin_t --methods vanilla wasi asi lora --pretrained
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch import nn  # noqa: E402

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
TRAIN_PHASES = ("forward", "backward", "optimizer")
PHASES = (*TRAIN_PHASES, "train_step", "inference")
RAW_COLUMNS = ("label", "method", "epsilon", "rep", "phase", "seconds")
SUMMARY_COLUMNS = ("label", "method", "epsilon", "phase", "n", "median_s", "q1_s", "q3_s",
                   "min_s", "max_s", "speedup_vs_vanilla")
EPSILONS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class Variant:
    """One timed configuration: the trained model, its optimizer, and the deployed model."""

    label: str
    method: str
    epsilon: float | None
    model: nn.Module
    optimizer: torch.optim.Optimizer
    inference_model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)


def build_variant(label: str, method: str, epsilon: float | None, model: nn.Module,
                  method_obj: Any, optimizer: Callable, calibration: tuple[torch.Tensor, torch.Tensor],
                  device: torch.device) -> Variant:
    """Apply an ``experiments.methods`` object to ``model`` and build its optimizer.

    method_obj: has ``apply(model, loader, device) -> dict``, ``build_optimizer(model, optimizer)``
    and ``inference_model(model)``; optimizer: a partial of a torch optimizer class
    (``conf/optimizer``); calibration: the one batch the method's loader yields.
    """
    summary = method_obj.apply(model, [calibration], device)
    opt = method_obj.build_optimizer(model, optimizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Variant(label, method, epsilon, model, opt, method_obj.inference_model(model),
                   {"trainable_params": trainable, "summary": summary})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_train_step(v: Variant, x: torch.Tensor, y: torch.Tensor, device: torch.device
                    ) -> dict[str, float]:
    """Seconds of forward (+ loss), backward and optimizer step of one training step.

    x: (B, 3, H, W); y: (B,) class indices.
    """
    v.model.train()
    _sync(device)
    t0 = time.perf_counter()
    loss = F.cross_entropy(v.model(x), y)
    _sync(device)
    t1 = time.perf_counter()
    loss.backward()
    _sync(device)
    t2 = time.perf_counter()
    v.optimizer.step()
    v.optimizer.zero_grad(set_to_none=True)
    _sync(device)
    t3 = time.perf_counter()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2}


@torch.no_grad()
def time_inference(v: Variant, x: torch.Tensor, device: torch.device) -> float:
    """Seconds of one eval-mode forward pass of the deployed model on x: (B, 3, H, W)."""
    v.inference_model.eval()
    _sync(device)
    t0 = time.perf_counter()
    v.inference_model(x)
    _sync(device)
    return time.perf_counter() - t0


def run_interleaved(variants: Sequence[Variant], x: torch.Tensor, y: torch.Tensor,
                    warmup: int, reps: int, device: torch.device) -> list[dict[str, Any]]:
    """Time every variant ``warmup + reps`` times, round-robin; returns the raw.csv rows.

    Round r runs the variants starting at index r mod len(variants), so no variant always
    follows the same neighbour. Warm-up rounds are run the same way and not recorded.
    """
    rows = []
    n = len(variants)
    for r in range(warmup + reps):
        for v in (variants[(r + i) % n] for i in range(n)):
            times = time_train_step(v, x, y, device)
            times["train_step"] = sum(times.values())
            times["inference"] = time_inference(v, x, device)
            if r < warmup:
                continue
            rows += [{"label": v.label, "method": v.method, "epsilon": v.epsilon, "rep": r - warmup,
                      "phase": phase, "seconds": times[phase]} for phase in PHASES]
        log.info("round %d/%d done (%s)", r + 1, warmup + reps, "warm-up" if r < warmup else "timed")
    return rows


def summarize(rows: Sequence[dict[str, Any]], reference: str = "vanilla") -> list[dict[str, Any]]:
    """Median, quartiles, min/max per (label, phase), and median(reference) / median(label).

    Rows come out in order of each label's first raw row, phases in PHASES order. The speed-up
    is None when the reference label was not timed.
    """
    groups: dict[tuple[str, str], list[float]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for row in rows:
        groups.setdefault((row["label"], row["phase"]), []).append(float(row["seconds"]))
        meta[row["label"]] = {"method": row["method"], "epsilon": row["epsilon"]}
    medians = {key: statistics.median(vals) for key, vals in groups.items()}
    labels = list(meta)
    out = []
    for (label, phase), vals in sorted(groups.items(), key=lambda kv: (
            labels.index(kv[0][0]), PHASES.index(kv[0][1]))):
        q1, q3 = np.percentile(vals, [25, 75])
        ref = medians.get((reference, phase))
        out.append({"label": label, **meta[label], "phase": phase, "n": len(vals),
                    "median_s": medians[label, phase], "q1_s": float(q1), "q3_s": float(q3),
                    "min_s": min(vals), "max_s": max(vals),
                    "speedup_vs_vanilla": None if ref is None else ref / medians[label, phase]})
    return out


def cpu_model() -> str:
    """CPU name from /proc/cpuinfo ('model name', or a Raspberry Pi's 'Model'), else platform."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    parts = [fields[k] for k in ("model name", "Model", "Hardware") if fields.get(k)]
    return " / ".join(parts) or platform.processor() or "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on besides the code: versions, threads, CPU, arch."""
    import timm

    env = {"torch": torch.__version__, "timm": timm.__version__,
           "python": platform.python_version(), "machine": platform.machine(),
           "platform": platform.platform(), "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(),
           "torch_interop_threads": torch.get_num_interop_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _fmt_ms(s: float) -> str:
    return f"{1e3 * s:.1f}"


def _ranks_text(summary: Any) -> str:
    """Mean weight rank K and activation ranks of the converted layers, from inject's summary."""
    layers = summary.get("layers") if isinstance(summary, dict) else None
    if not layers:
        return ""
    ks = [layer["weight_rank"] for layer in layers if layer.get("weight_rank") is not None]
    acts = [tuple(layer["act_ranks"]) for layer in layers if layer.get("act_ranks")]
    text = f"{len(layers)} layers"
    if ks:
        text += f", mean K {statistics.mean(ks):.1f}"
    if acts:
        text += ", mean act ranks " + "x".join(f"{statistics.mean(r):.0f}" for r in zip(*acts))
    return text


def summary_markdown(summary: Sequence[dict[str, Any]], variants: Sequence[Variant],
                     env: dict[str, Any], settings: dict[str, Any]) -> str:
    """Environment, settings, variants and a timing table (median [q1, q3] in ms)."""
    cell = {(r["label"], r["phase"]): r for r in summary}
    lines = ["# Latency benchmark", "", "## Environment", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "## Settings", ""] + [f"- {k}: {v}" for k, v in settings.items()]
    lines += ["", "## Variants", "", "| label | trainable params | converted layers |",
              "|---|---|---|"]
    lines += [f"| {v.label} | {v.info['trainable_params']:,} | {_ranks_text(v.info['summary'])} |"
              for v in variants]
    lines += ["", "## Timing per batch (ms): median [q1, q3]; speed-up = median(vanilla) / median",
              "", "| label | " + " | ".join(PHASES) + " | speed-up train | speed-up inference |",
              "|---|" + "---|" * (len(PHASES) + 2)]
    for v in variants:
        row = [f"{_fmt_ms(c['median_s'])} [{_fmt_ms(c['q1_s'])}, {_fmt_ms(c['q3_s'])}]"
               for c in (cell[v.label, p] for p in PHASES)]
        ratios = [cell[v.label, p]["speedup_vs_vanilla"] for p in ("train_step", "inference")]
        row += ["" if r is None else f"{r:.2f}x" for r in ratios]
        lines.append(f"| {v.label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_latency(summary: Sequence[dict[str, Any]], labels: Sequence[str], path: Path) -> None:
    """Stacked forward/backward/optimizer medians, and median + IQR of train step and inference."""
    cell = {(r["label"], r["phase"]): r for r in summary}
    xs = np.arange(len(labels))
    fig, (ax_train, ax_inf) = plt.subplots(1, 2, figsize=(max(8.0, 1.4 * len(labels)), 4.5))
    bottom = np.zeros(len(labels))
    for phase in TRAIN_PHASES:
        heights = np.array([1e3 * cell[lab, phase]["median_s"] for lab in labels])
        ax_train.bar(xs, heights, 0.6, bottom=bottom, label=phase)
        bottom += heights
    for ax, phase in ((ax_train, "train_step"), (ax_inf, "inference")):
        med = np.array([1e3 * cell[lab, phase]["median_s"] for lab in labels])
        err = np.array([[1e3 * (cell[lab, phase]["median_s"] - cell[lab, phase]["q1_s"]),
                         1e3 * (cell[lab, phase]["q3_s"] - cell[lab, phase]["median_s"])]
                        for lab in labels]).T
        if ax is ax_inf:
            ax.bar(xs, med, 0.6, color="tab:gray")
        ax.errorbar(xs, med, yerr=err, fmt="ko", markersize=4, capsize=3,
                    label=f"{phase} median, IQR")
        for x, lab, top in zip(xs, labels, np.maximum(med + err[1], bottom if ax is ax_train else 0)):
            ratio = cell[lab, phase]["speedup_vs_vanilla"]
            if ratio is not None:
                ax.annotate(f"{ratio:.2f}x", (x, top), xytext=(0, 4), textcoords="offset points",
                            ha="center", fontsize=8)
        ax.set_xticks(xs, labels, rotation=30, ha="right")
        ax.set_ylabel("ms per batch")
        ax.set_title(f"{phase}: speed-up vs vanilla above bars")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: ("" if row[k] is None else row[k]) for k in columns} for row in rows)


def benchmark(variants: Sequence[Variant], x: torch.Tensor, y: torch.Tensor, out: Path,
              warmup: int, reps: int, device: torch.device, settings: dict[str, Any]) -> str:
    """Time the variants, write every output file into ``out``; returns summary.md's text."""
    out.mkdir(parents=True, exist_ok=True)
    rows = run_interleaved(variants, x, y, warmup, reps, device)
    order = {v.label: i for i, v in enumerate(variants)}
    summary = summarize(sorted(rows, key=lambda r: order[r["label"]]))
    env = environment(device)
    _write_csv(out / "raw.csv", RAW_COLUMNS, rows)
    _write_csv(out / "summary.csv", SUMMARY_COLUMNS, summary)
    text = summary_markdown(summary, variants, env, settings)
    (out / "summary.md").write_text(text)
    plot_latency(summary, [v.label for v in variants], out / "latency.png")
    run = {"environment": env, "settings": settings,
           "variants": {v.label: v.info for v in variants}}
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str))
    log.info("wrote %s", out)
    return text


def input_batch(cfg: DictConfig | None, batch: int, image_size: int, num_classes: int, seed: int
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """x: (batch, 3, S, S), y: (batch,) and the class count: gaussian noise with random labels
    when ``cfg`` is None, else a shuffled batch of ``cfg.dataset``'s training split."""
    torch.manual_seed(seed)
    if cfg is None:
        return (torch.randn(batch, 3, image_size, image_size),
                torch.randint(0, num_classes, (batch,)), num_classes)
    from torch.utils.data import DataLoader

    from experiments.data import build_datasets

    data = build_datasets(cfg.dataset, image_size, seed)
    x, y = next(iter(DataLoader(data.train, batch, shuffle=True)))
    return x, y, data.num_classes


def compose(overrides: Sequence[str]) -> DictConfig:
    """The project's Hydra config with ``overrides`` (``conf/config.yaml`` defaults)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return hydra_compose("config", overrides=list(overrides))


def _set(cfg: DictConfig, key: str, value: Any) -> None:
    """cfg.method[key] = value where the method's config has that key."""
    if key in cfg.method:
        cfg.method[key] = value


def method_configs(args: argparse.Namespace, base: Sequence[str], last_n: int
                   ) -> list[tuple[str, str, float | None, DictConfig]]:
    """(label, method name, ε, composed cfg) for every method, once per ε where ε matters.

    ε sets the weight rank (``epsilon``) and, unless ``--act-ranks`` fixes them, the activation
    ranks (``epsilon_act``); a method with neither (vanilla, lora, asi with fixed ranks) runs once.
    """
    out = []
    for name in args.methods:
        cfg = compose([*base, f"method={name}", *args.override])
        _set(cfg, "last_n", last_n)
        _set(cfg, "targets", args.targets)
        # No on-disk caches: they are keyed by model name, not by these (possibly random) weights.
        _set(cfg, "rank_table", None)
        _set(cfg, "cache", None)
        if args.act_ranks and cfg.method.get("activation"):
            cfg.method.ranks, cfg.method.epsilon_act = list(args.act_ranks), None
        uses_eps = "epsilon" in cfg.method and (cfg.method.get("weight", True)
                                                or cfg.method.get("epsilon_act") is not None)
        if not uses_eps:
            out.append((name, name, None, cfg))
            continue
        for eps in args.epsilons:
            c = copy.deepcopy(cfg)
            c.method.epsilon = eps
            if c.method.get("epsilon_act") is not None:
                c.method.epsilon_act = eps
            out.append((f"{name}@{eps:g}", name, eps, c))
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_b32", help="conf/model file: vit_b32, swin_t, ...")
    p.add_argument("--methods", nargs="+", default=["vanilla", "wasi"],
                   help="conf/method files; those with an epsilon run once per --epsilons value")
    p.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS),
                   help="ε for the weight rank K, and for the activation ranks unless --act-ranks")
    p.add_argument("--act-ranks", nargs="+", type=int, default=None,
                   help="fixed per-mode Tucker ranks instead of epsilon_act = ε")
    p.add_argument("--targets", default="mlp", choices=["mlp", "mlp+attn"])
    p.add_argument("--last-n", type=int, default=None,
                   help="train the last n target layers (+ head) in every method, vanilla "
                        "included; default: all target layers")
    p.add_argument("--hardware", default="cpu_pi", help="conf/hardware file (device, threads)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: hardware's)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=None, help="default: the model config's")
    p.add_argument("--num-classes", type=int, default=10, help="head size for gaussian input")
    p.add_argument("--dataset", default=None,
                   help="conf/dataset file: time (and calibrate activation ranks) on one batch "
                        "of its training split instead of gaussian noise")
    p.add_argument("--pretrained", action="store_true",
                   help="hub weights (needs internet or a filled HF cache); default random init")
    p.add_argument("--checkpoint", default=None, help="local weights file (.safetensors/.pth)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", nargs="*", default=[],
                   help="extra Hydra overrides for every variant, e.g. optimizer.lr=0.01")
    p.add_argument("--out", type=Path, default=None,
                   help="default: results/pi_latency/<--tag or timestamp>")
    p.add_argument("--tag", default=None)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """CLI entry point; returns the output folder."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import hydra.utils

    import wasi
    from experiments.models import build_model
    from experiments.run import setup_hardware

    base = [f"model={args.model}", f"hardware={args.hardware}", f"seed={args.seed}",
            f"trainer.batch_size={args.batch}", f"model.pretrained={args.pretrained}"]
    if args.checkpoint:
        base.append(f"model.checkpoint={args.checkpoint}")
    if args.dataset:
        base.append(f"dataset={args.dataset}")
    if args.threads:
        base.append(f"hardware.threads={args.threads}")
    if args.image_size:
        base += [f"model.image_size={args.image_size}", f"++model.kwargs.img_size={args.image_size}"]
    probe_cfg = compose([*base, *args.override])
    if probe_cfg.hardware.precision != "fp32":
        raise ValueError(f"device.latency times fp32 only, hardware={args.hardware} has precision="
                         f"{probe_cfg.hardware.precision}; use --hardware cpu_pi, cpu or cuda")
    device = setup_hardware(probe_cfg.hardware)
    image_size = probe_cfg.model.image_size
    x, y, num_classes = input_batch(probe_cfg if args.dataset else None, args.batch, image_size,
                                    args.num_classes, args.seed)
    x, y = x.to(device), y.to(device)

    def fresh_model(cfg: DictConfig) -> nn.Module:
        torch.manual_seed(args.seed)  # every variant starts from the same weights
        return build_model(cfg.model, num_classes).to(device)

    last_n = args.last_n or len(wasi.find_targets(fresh_model(probe_cfg), args.targets))
    variants = []
    for label, name, eps, cfg in method_configs(args, base, last_n):
        variants.append(build_variant(label, name, eps, fresh_model(cfg),
                                      hydra.utils.instantiate(cfg.method),
                                      hydra.utils.instantiate(cfg.optimizer), (x, y), device))
        log.info("built %s: %d trainable params", label, variants[-1].info["trainable_params"])
    weights = ("checkpoint " + args.checkpoint if args.checkpoint else
               "pretrained (hub)" if args.pretrained else
               "random init (weight ranks K are larger than with pretrained weights)")
    settings = {"model": f"{args.model} ({probe_cfg.model.timm_name})", "weights": weights,
                "batch": args.batch, "image_size": image_size, "num_classes": num_classes,
                "targets": args.targets, "last_n": last_n,
                "activation ranks": args.act_ranks or "epsilon_act = ε",
                "hardware": args.hardware, "precision": probe_cfg.hardware.precision,
                "warmup": args.warmup, "reps": args.reps,
                "input": f"one {args.dataset} training batch" if args.dataset else "gaussian noise",
                "overrides": " ".join(args.override) or "none"}
    out = args.out or Path("results/pi_latency") / (args.tag or datetime.now().strftime("%Y%m%d-%H%M%S"))
    text = benchmark(variants, x, y, out, args.warmup, args.reps, device, settings)
    print(text[text.index("## Timing"):])
    return out


if __name__ == "__main__":
    main()
