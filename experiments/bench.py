"""Measure fine-tuning variants side by side in one process: cost (FLOPs, memory) and time.

    python -m experiments.bench --model vit_b32 --batch 128 --methods vanilla wasi --eps 0.4 0.8 \\
        --recompute none mlp block --spectrum pretrained --data shapes --measure cost
    python -m experiments.bench --model vit_b32 --batch 32 --threads 2 --measure time ...
    python -m experiments.bench --preset pi ...     # make pi-latency: the Raspberry Pi 5 profile (PRESETS)
    python -m experiments.bench --model tinyllama --batch 8 --data yesno --eps 0.1 ... # a text model: token batches

Every variant (method × ε × recompute) is composed from conf/ and built by
`experiments.builders.variant.build_variant`, exactly as a training run builds it, on the same weights
(`--spectrum`, `--checkpoint`) and measured on the same batch (`--data`: the first --batch training
images of a dataset config, or for a text model the first --batch sequences of a text dataset config tokenized by the
model's tokenizer at its max length; or `noise`). `--measure cost` uses the functions behind a run's
results.json (`experiments.measurement.metrics.measure`, one variant at a time); `--measure time` times every
variant's forward, backward and optimizer step and its inference round-robin (repetition r of every
variant, starting one variant later each round), so a slow spell of the machine hits all alike;
`--measure energy` reads the machine's energy counters (experiments.measurement.energy: NVML, RAPL, a
Jetson's rails) around the same training steps and inferences of the same rounds (joules per training step
and per inference: means over the timed rounds), or says in one line that there is none.
Ratios `×` are the reference's value over the variant's (reference: vanilla without recompute, else
the first variant), from medians; with cost and time measured together, `step × / FLOPs ×` is how much of
its FLOPs ratio a variant's measured speed-up achieves. A method that lacks a requested recompute mode
(vanilla has no `mlp`) is measured with its nearest one, and the table says so. `--compile on|both` times
the training step under torch.compile (both: eager and compiled rows side by side); `--profile-baseline`
puts another run's profile.csv (the same command on the code before a change) next to this one's.
Writes under --out: variants.csv (one row per variant), summary.md, saved_tensors.csv (cost), timing.csv,
timing_raw.csv, latency.png (time), energy.csv (energy), profile.csv and ops.csv (profile: torch.profiler's time
in the library's Tucker step, compressed gradient and factored update, and in the ops that take the most of
the step) and run.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, get_args

import matplotlib
import pandas as pd
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import default_collate

import experiments.configuration.schema  # noqa: F401  (registers the config schemas that conf/ extends)
import wasi.config
from experiments import CONF_DIR
from experiments.builders.inputs import Inputs, data_arguments, logits
from experiments.builders.variant import Variant, build_variant, train_step
from experiments.configuration.choices import Spectrum
from experiments.configuration.schema import ConfigError, check_inputs
from experiments.data.loaders import to_device
from experiments.measurement import metrics
from experiments.measurement.energy import EnergyMeter, NoEnergySensor, open_meter
from experiments.measurement.environment import environment
from experiments.training import errors
from experiments.training.hardware import autocast, seed_everything, setup_hardware
from wasi import EPS_SET

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)

CONF = CONF_DIR
PHASES = ("forward", "backward", "optimizer", "train_step", "inference")
REGIONS = ("wasi.tucker", "wasi.compressed_grad", "wasi.factored_update")  # record_function labels in wasi/
TOP_OPS = 15  # ops.csv: this many (op, input shapes) pairs per variant, by self time
SHAPED_STEP = "step (shapes recorded)"  # profile.csv: the step of the profile that ops.csv comes from
COST = ("memory/activation_bytes", "memory/peak_bytes", "memory/weight_bytes", "flops/train_step",
        "flops/inference_per_image", "flops/inference_per_sequence", "memory/layers_activation_bytes",
        "memory/layers_weight_bytes", "flops/layers_train_step", "flops/layers_inference")
#: Named sets of defaults (`--preset NAME`); flags after them override them. "pi": the Raspberry Pi 5 profile
#: of `make pi-latency` (device/README.md): conf/hardware/cpu_pi.yaml (4 threads, fp32), timing.
PRESETS = {"pi": ["--hardware", "cpu_pi", "--measure", "time", "--out-root", "outputs/pi_latency"]}


class BenchArgumentError(ConfigError):
    """A flag of the command line is wrong; the message names it and the fix (exit status 2)."""


@dataclass
class Spec:
    """One variant to build: its label, what it is, the Hydra overrides that compose it, and whether it is built
    compiled (`torch.compile` of the model for timing and profiling)."""

    label: str
    method: str
    epsilon: float | None
    recompute: str | None
    overrides: list[str]
    compiled: bool = False
    notes: list[str] = field(default_factory=list)  # e.g. which requested recompute mode this row stands for


def compose_cfg(overrides: Sequence[str]) -> DictConfig:
    """conf/config.yaml composed with these overrides, as train.py composes it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def base_overrides(args: argparse.Namespace) -> list[str]:
    """Overrides shared by every variant: model, weights, data, batch, hardware, then --set."""
    out = [f"model={args.model}", f"hardware={args.hardware}", f"trainer.batch_size={args.batch}"]
    out += [f"model.checkpoint={args.checkpoint}"] if args.checkpoint else [f"model.pretrained={args.hub}"]
    out += [] if args.data == "noise" else [f"dataset={args.data}"]
    out += [f"hardware.threads={args.threads}"] if args.threads else []
    return [*out, *args.set]


def nearest_recompute(mode: str, supported: Sequence[str]) -> str:
    """The recompute mode of `supported` closest to `mode` on the ladder none < mlp < attn < block
    (wasi.config.RECOMPUTE), the one recomputing less on a tie: vanilla's for mlp is none."""
    rung = wasi.config.RECOMPUTE.index
    return min(supported, key=lambda m: (abs(rung(m) - rung(mode)), rung(m)))


def variant_specs(args: argparse.Namespace, base: list[str]) -> list[Spec]:
    """Every method of --methods, once per --eps value where ε matters to it (a weight rank K, or activation
    ranks from epsilon_act, which follows ε unless set), once per --recompute mode, and with --compile both,
    eagerly and compiled. A method without a requested mode (mlp needs the low-rank layers of WSI/WASI) is
    measured with its nearest mode (`nearest_recompute`), labelled "[none for mlp]" unless that mode is among
    its rows anyway; never dropped: the row's `notes` say what it stands for. A method that builds its optimizer
    from one optimizer group (its schema's `optimizer_need`: LoRA-FA, GaLore from optimizer=adamw) gets that
    group, unless --set chooses one."""
    specs: list[Spec] = []
    chosen_optimizer = any(o.startswith(("optimizer=", "+optimizer=")) for o in args.set)
    for name in args.methods:
        method = compose_cfg([*base, f"method={name}"]).method
        supported = instantiate(method).recomputes
        need = getattr(OmegaConf.get_type(method), "optimizer_need", None)  # e.g. GaLore: optimizer=adamw
        own = [] if need is None or chosen_optimizer else [f"optimizer={need.choice}"]
        activation_from_eps = method.get("ranks") is None and method.get("budget_mib") is None  # epsilon_act = ε
        uses_eps = "epsilon" in method and (method.get("weight", True) or activation_from_eps)
        requested = args.recompute or [None]
        for eps in args.eps if uses_eps else [None]:
            chosen: dict[str | None, tuple[str, list[str]]] = {}  # mode to build -> (label suffix, modes it stands for)
            for mode in requested:
                if mode is None or mode in supported:
                    chosen.setdefault(mode, ("" if mode is None else f" [{mode}]", []))
                    continue
                near = nearest_recompute(mode, supported)
                suffix = f" [{near}]" if near in requested else f" [{near} for {mode}]"
                chosen.setdefault(near, (suffix, []))[1].append(mode)
            for mode, (suffix, stands_for) in chosen.items():
                label = name + ("" if eps is None else f" ε={eps:g}") + suffix
                notes = [f"{name} has no recompute={m}; the row {label} stands for it (its nearest mode, {mode})"
                         for m in stands_for]
                overrides = [*base, f"method={name}", *own] + ([] if eps is None else [f"method.epsilon={eps}"])
                overrides += [] if mode is None else [f"method.recompute={mode}"]
                for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
                    specs.append(Spec(label + (" compiled" if compiled and args.compile == "both" else ""), name,
                                      eps, mode, overrides, compiled, list(notes)))
    return specs


def make_batch(cfg: DictConfig, size: int, data: str) -> tuple[Inputs, torch.Tensor, int]:
    """x, y: (size,) and the number of classes: the first `size` training items of cfg.dataset (images (size, 3, S, S),
    or token ids and masks (size, L) of a text dataset, as a training run's loader batches them), or for
    data="noise" seeded random inputs with random labels of 10 classes: N(0, 1) images, or token ids drawn uniformly
    from the model's vocabulary (model.config.vocab_size, else its tokenizer's) with no padding."""
    g = torch.Generator().manual_seed(cfg.seed)
    if data == "noise":
        labels = torch.randint(0, 10, (size,), generator=g)
        if cfg.model.get("inputs", "image") == "image":
            s = cfg.model.image_size
            return torch.randn(size, 3, s, s, generator=g), labels, 10
        vocab = cfg.model.config.get("vocab_size") or len(data_arguments(cfg.model)["tokenizer"])
        ids = torch.randint(0, vocab, (size, cfg.model.max_length), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels, 10
    splits = instantiate(cfg.dataset)(**data_arguments(cfg.model), seed=cfg.seed)
    if len(splits.train) < size:
        raise BenchArgumentError(f"--batch {size} is larger than the {len(splits.train)} training items of "
                                 f"--data {data}. Fix: --batch {len(splits.train)} or less, or a larger dataset")
    x, y = default_collate([splits.train[i] for i in range(size)])
    return x, y, splits.num_classes


def describe(spec: Spec, variant: Variant) -> dict[str, Any]:
    """The row's identity: method, ε, recompute, ranks and parameter counts."""
    layers = variant.summary.get("layers", [])
    ks = [layer["weight_rank"] for layer in layers if layer["weight_rank"] is not None]
    return {"label": spec.label, "method": spec.method, "epsilon": spec.epsilon,
            "recompute": getattr(variant.method, "recompute", None), "optimizer": optimizer_name(variant.optimizer),
            "K_mean": sum(ks) / len(ks) if ks else None, "K": ks or None,
            "act_ranks": [layer["act_ranks"] for layer in layers if layer["act_ranks"]] or None,
            **{f"params/{k}": v for k, v in metrics.count_parameters(variant.model).items()}}


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer's class, with its package unless it is torch's: SGD, peft.LoraFAOptimizer, galore_torch.AdamW."""
    package = type(optimizer).__module__.split(".")[0]
    return type(optimizer).__name__ if package == "torch" else f"{package}.{type(optimizer).__name__}"


def measure_cost(variant: Variant, cfg: DictConfig, x: Inputs, y: torch.Tensor,
                 device: torch.device) -> tuple[dict[str, Any], dict[str, int]]:
    """(cost metrics of one training step, held activation bytes by source) of a freshly built variant."""
    amp = autocast(cfg.hardware, device)
    row = metrics.measure(variant, x, y, grad_clip=cfg.trainer.grad_clip, amp=amp, device=device, repeats=0)

    def forward() -> torch.Tensor:
        with amp:
            return F.cross_entropy(logits(variant.model, x), y)

    return row, metrics.held_activations(forward, variant.model)


def time_round_robin(built: list[tuple[Spec, Variant, DictConfig]], x: Inputs, y: torch.Tensor,
                     device: torch.device, warmup: int, reps: int, meter: EnergyMeter | None = None) -> pd.DataFrame:
    """Seconds per phase of every variant, round-robin; one row per (label, rep, phase). With `meter`, the
    train_step and inference rows also hold `joules/<domain>`: the counters read (after a device sync)
    just before the step's first clock and after its last, and around the inference."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def energy() -> dict[str, float]:
        if meter is None:
            return {}
        sync()
        return meter.read()

    def used(start: dict[str, float], end: dict[str, float]) -> dict[str, float]:
        return {f"joules/{domain}": end[domain] - start[domain] for domain in start}

    rows, n = [], len(built)
    for r in range(warmup + reps):
        for spec, variant, cfg in (built[(r + i) % n] for i in range(n)):
            amp, marks = autocast(cfg.hardware, device), []

            def clock(marks: list[float] = marks) -> None:
                sync()
                marks.append(time.perf_counter())

            variant.model.train()
            step_start = energy()
            clock()
            train_step(variant.model, variant.optimizer, x, y, cfg.trainer.grad_clip, amp, clock)
            step_end = energy()
            joules = {"train_step": used(step_start, step_end)}
            if not spec.compiled:  # a compiled row compares the training step; its inference is not timed
                deployed = variant.method.inference_model(variant.model).eval()
                with torch.no_grad(), amp:
                    inference_start = energy()
                    clock()
                    logits(deployed, x)
                    clock()
                    inference_end = energy()
                joules["inference"] = used(inference_start, inference_end)
            t = [b - a for a, b in zip(marks, marks[1:])]
            seconds = {"forward": t[0], "backward": t[1], "optimizer": t[2], "train_step": sum(t[:3])}
            seconds.update({} if spec.compiled else {"inference": t[4]})
            if r >= warmup:
                rows += [{"label": spec.label, "rep": r - warmup, "phase": p, "seconds": seconds[p],
                          **joules.get(p, {})} for p in PHASES if p in seconds]
        log.info("timing round %d/%d (%s)", r + 1, warmup + reps, "warm-up" if r < warmup else "timed")
    return pd.DataFrame(rows)


def profile_regions(built: list[tuple[Spec, Variant, DictConfig]], x: Inputs, y: torch.Tensor,
                    device: torch.device, warmup: int, reps: int, top: int = TOP_OPS
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Where a training step's time goes, by torch.profiler over `reps` steps after `warmup`, one variant at a
    time (CPU time, which is wall time on CPU; with CUDA the host time). Returns two frames:
    regions, one row per (label, region) of ("step", *REGIONS, SHAPED_STEP): seconds and calls per step, share =
    region time / step time; ops, the `top` (op, input shapes) pairs of each label by self time (time inside the op
    itself, its children excluded, so the rows never count a time twice): seconds and calls per step, share of the
    step they were profiled in (SHAPED_STEP).

    Each variant is profiled twice: the regions without recording input shapes, the ops with them. Recording shapes
    slows some ops far more than others, which would skew every region's share: on 2 cores of an Intel Xeon a WASI
    ViT-B/32 step at ε = 0.8 took 3.2-3.5 s with shapes recorded, 2.0-2.3 s without and 1.95-2.0 s unprofiled,
    the extra time almost all in the two products that write a (1600, 3072) output, with 98 000-173 000 page faults
    per step against a few (docs/results.md, "Where a WASI step spends its time")."""
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    def profiled(variant: Variant, cfg: DictConfig, record_shapes: bool) -> profile:
        window = schedule(wait=0, warmup=warmup, active=reps, repeat=1)  # warm-up steps run but are not counted
        with profile(activities=[ProfilerActivity.CPU], schedule=window, record_shapes=record_shapes) as prof:
            for _ in range(warmup + reps):
                with record_function("step"):
                    train_step(variant.model, variant.optimizer, x, y, cfg.trainer.grad_clip,
                               autocast(cfg.hardware, device))
                prof.step()
        return prof

    def per_step(prof: profile) -> dict[str, tuple[float, float]]:
        return {e.key: (e.cpu_time_total / reps / 1e6, e.count / reps) for e in prof.key_averages()}

    regions, ops = [], []
    for spec, variant, cfg in built:
        variant.model.train()
        events = per_step(profiled(variant, cfg, record_shapes=False))
        shaped = profiled(variant, cfg, record_shapes=True)
        events[SHAPED_STEP] = per_step(shaped)["step"]
        for region in ("step", *REGIONS, SHAPED_STEP):
            seconds, calls = events.get(region, (0.0, 0.0))
            regions.append({"label": spec.label, "region": region, "seconds": seconds, "calls": calls,
                            "share": seconds / events["step"][0]})
        shaped_step = events[SHAPED_STEP][0]
        by_shape = sorted(shaped.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        ops += [{"label": spec.label, "op": e.key, "shapes": " ".join(str(s) for s in e.input_shapes if s),
                 "seconds": e.self_cpu_time_total / reps / 1e6, "calls": e.count / reps,
                 "share": e.self_cpu_time_total / reps / 1e6 / shaped_step} for e in by_shape[:top]]
        log.info("profiled %s", spec.label)
    return pd.DataFrame(regions), pd.DataFrame(ops)


def timing_stats(raw: pd.DataFrame, reference: str, threads: int) -> pd.DataFrame:
    """Median and IQR per (label, phase), by torch.utils.benchmark's Measurement, and the speed-up
    median(reference) / median(label) of the same phase."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on import
    import torch.utils.benchmark as benchmark

    rows = []
    for (label, phase), group in raw.groupby(["label", "phase"], sort=False):
        m = benchmark.Measurement(1, group["seconds"].tolist(), benchmark.TaskSpec(
            stmt=phase, setup="", label="train step phases", sub_label=label, description=phase, num_threads=threads))
        rows.append({"label": label, "phase": phase, "n": len(group), "median_s": m.median, "iqr_s": m.iqr})
    stats = pd.DataFrame(rows)
    ref = stats[stats.label == reference].set_index("phase")["median_s"]
    stats["speedup"] = stats["phase"].map(ref) / stats["median_s"]
    return stats


def energy_stats(raw: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Joules per training step and per inference of every variant and energy domain: the mean over the timed
    rounds (a counter that advances in jumps reads 0 or a jump in one window, so no median), and the ratio
    mean(reference) / mean(label) of the same phase and domain. One row per (label, phase, domain)."""
    columns = [c for c in raw if c.startswith("joules/")]
    long = raw.dropna(subset=columns).melt(id_vars=["label", "phase"], value_vars=columns, var_name="domain",
                                           value_name="joules")
    long["domain"] = long["domain"].str.removeprefix("joules/")
    stats = long.groupby(["label", "phase", "domain"], sort=False)["joules"].agg(n="count", mean_j="mean",
                                                                                 std_j="std").reset_index()
    ref = stats[stats.label == reference].set_index(["phase", "domain"])["mean_j"]
    stats["ratio"] = [ref.get((p, d), float("nan")) / m if m else float("nan")
                      for p, d, m in zip(stats.phase, stats.domain, stats.mean_j)]
    return stats


def add_ratios(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """`layers ×`, the paper's per-layer figure (dense / compressed bytes of the converted layers), `layers
    activation ×` and `layers weight ×` (the same for the fine-tuned layers' activations and weights apart), and, once
    the reference row exists, `<metric> ×` = the reference's value / the row's for the cost metrics."""
    if "memory/compressed_layers_bytes" in table:
        table["layers ×"] = table["memory/compressed_layers_vanilla_bytes"] / table["memory/compressed_layers_bytes"]
    for part in ("activation", "weight"):  # the same layers dense / as the row keeps them (the paper's figures)
        if f"memory/layers_{part}_bytes" in table:
            dense, held = table[f"memory/layers_{part}_dense_bytes"], table[f"memory/layers_{part}_bytes"]
            table[f"layers {part} ×"] = dense / held
    if reference in set(table.label):
        ref = table.set_index("label").loc[reference]
        for key in COST:
            if key in table:
                table[f"{key} ×"] = ref[key] / table[key]
    return table


def add_efficiency(table: pd.DataFrame) -> pd.DataFrame:
    """`step × / FLOPs ×`: the measured train-step speed-up over the reference divided by its train-FLOPs ratio,
    how much of what its arithmetic allows a variant's step achieves (1: time scales with FLOPs)."""
    if "time/train_step_s ×" in table and "flops/train_step ×" in table:
        table["time/train_step_s × / flops ×"] = table["time/train_step_s ×"] / table["flops/train_step ×"]
    return table


def profile_table(profiled: pd.DataFrame, baseline: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per label, `ms (% of the step)` in each region (REGIONS); with a baseline profile.csv (the same command
    run on other code, e.g. before a change), `before → after` in each cell, for the labels both runs have."""
    def cells(frame: pd.DataFrame) -> pd.Series:
        text = [f"{1e3 * t:.0f} ms ({100 * f:.1f}%)" for t, f in zip(frame.seconds, frame.share)]
        return pd.Series(text, index=pd.MultiIndex.from_arrays([frame.label, frame.region]))

    after = cells(profiled)
    if baseline is not None:
        before = cells(baseline)
        after = pd.Series({k: f"{before[k]} → {v}" if k in before.index else v for k, v in after.items()})
        after.index = pd.MultiIndex.from_tuples(after.index)
    table = after.unstack()
    return table.loc[list(dict.fromkeys(profiled.label)), ["step", *REGIONS]]


def markdown(table: pd.DataFrame, breakdown: dict[str, dict[str, int]], header: str,
             profiled: pd.DataFrame | None = None, baseline: pd.DataFrame | None = None,
             ops: pd.DataFrame | None = None) -> str:
    """summary.md: the main table (MiB, GFLOPs, ms, × vs the reference), ranks, saved-tensor sources,
    profiled regions and the heaviest ops."""
    mib, g = 2.0**20, 1e9
    cols = {"label": ("variant", None), "K_mean": ("K mean", 1), "memory/compressed_layers_bytes": ("layers MiB", mib),
            "layers ×": ("layers ×", 1), "memory/activation_bytes": ("act MiB", mib),
            "memory/activation_bytes ×": ("act ×", 1), "memory/peak_bytes": ("peak MiB", mib),
            "memory/peak_bytes ×": ("peak ×", 1), "memory/weight_bytes": ("weights MiB", mib),
            "flops/train_step": ("train GFLOPs", g), "flops/train_step ×": ("train FLOPs ×", 1),
            "flops/inference_per_image": ("infer GFLOPs/img", g),
            "flops/inference_per_sequence": ("infer GFLOPs/seq", g),
            "memory/layers_activation_bytes": ("tuned act MiB", mib), "layers activation ×": ("tuned act × dense", 1),
            "memory/layers_weight_bytes": ("tuned weights MiB", mib), "layers weight ×": ("tuned weights × dense", 1),
            "flops/layers_train_step": ("tuned train GFLOPs", g), "flops/layers_train_step ×": ("tuned train ×", 1),
            "flops/layers_inference": ("tuned infer GFLOPs", g), "flops/layers_inference ×": ("tuned infer ×", 1),
            "time/train_step_s": ("step ms", 1e-3),
            "time/train_step_s ×": ("step ×", 1), "time/train_step_s × / flops ×": ("step × / FLOPs ×", 1),
            "time/inference_s": ("infer ms", 1e-3), "time/inference_s ×": ("infer ×", 1)}
    cols.update({key: (f"{phase} J {key.split('/')[1]}", 1) for key in table if key.startswith("energy/")
                 for phase in ["step" if key.endswith("/train_step_j") else "infer"]})
    cols = {"label": cols.pop("label"), "optimizer": ("optimizer", None), **cols}
    shown = pd.DataFrame({name: table[key] if scale is None else (table[key] / scale).round(2)
                          for key, (name, scale) in cols.items() if key in table})
    lines = [header, "", shown.to_markdown(index=False, floatfmt="g"), ""]
    ranked = table.dropna(subset=["K"]) if "K" in table else table.iloc[:0]
    if len(ranked) or ("act_ranks" in table and table["act_ranks"].notna().any()):
        lines += ["Weight ranks K and activation ranks per converted layer, in forward order:", ""]
        lines += [f"- {r.label}: K={r.K}; act_ranks={r.act_ranks}" for r in table.itertuples() if r.K or r.act_ranks]
    if breakdown:
        sources = pd.DataFrame(breakdown).fillna(0) / mib
        sources = sources.loc[sources.max(axis=1).sort_values(ascending=False).index]
        sources.loc["total"] = sources.sum()
        lines += ["", "Memory held from forward to backward by the module and op that created it (MiB, all "
                  "blocks summed; `metrics.held_activations`):", "", sources.round(1).to_markdown(floatfmt="g")]
    if profiled is not None:
        what = "; before → after, before from --profile-baseline" if baseline is not None else ""
        lines += ["", f"Time per step in the library's labelled regions (torch.profiler; % of the step{what}):", "",
                  profile_table(profiled, baseline).to_markdown()]
    shaped = {} if profiled is None else profiled[profiled.region == SHAPED_STEP].set_index("label").seconds
    for label, rows in ([] if ops is None else ops.groupby("label", sort=False)):
        shown = pd.DataFrame({"op": rows.op, "input shapes": rows.shapes, "ms per step": (1e3 * rows.seconds).round(1),
                              "calls per step": rows.calls.round(1), "% of the step": (100 * rows.share).round(1)})
        lines += ["", f"{label}: the ops with the most self time per step (their children excluded), from a second "
                  f"profile that records input shapes, whose step took {1e3 * shaped[label]:.1f} ms (recording "
                  "them slows some ops more than others):", "", shown.to_markdown(index=False)]
    return "\n".join(lines) + "\n"


def plot_latency(stats: pd.DataFrame, path: Path) -> None:
    """Stacked forward / backward / optimizer medians per variant, train-step speed-ups annotated."""
    labels = list(dict.fromkeys(stats.label))
    median = stats.pivot(index="label", columns="phase", values="median_s").loc[labels] * 1e3
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(labels)), 4.5))
    median[["forward", "backward", "optimizer"]].plot.bar(stacked=True, ax=ax, rot=30)
    speedup = stats[stats.phase == "train_step"].set_index("label")["speedup"]
    for i, label in enumerate(labels):
        ax.annotate(f"{speedup[label]:.2f}×", (i, median.loc[label, "train_step"]), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=8)
    ax.set_ylabel("ms per training step (median)")
    ax.set_xlabel("")
    ax.set_title("training step by phase; train-step speed-up vs the reference above the bars")
    plt.setp(ax.get_xticklabels(), ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def choices(group: str) -> list[str]:
    """The choices of a config group: conf/<group>/**/*.yaml, e.g. vanilla, paper/wasi."""
    return sorted(str(f.relative_to(CONF_DIR / group).with_suffix("")) for f in (CONF_DIR / group).rglob("*.yaml"))


def check_args(args: argparse.Namespace) -> None:
    """BenchArgumentError for the first flag that cannot work (a range, a config choice that does not exist, a
    missing file), before anything is composed, built or written."""
    for flag, value, low, fix in (("--batch", args.batch, 1, "--batch 128"), ("--reps", args.reps, 1, "--reps 10"),
                                  ("--warmup", args.warmup, 0, "--warmup 2"), ("--threads", args.threads, 1,
                                                                                  "--threads 4, or leave it out")):
        if value is not None and value < low:
            raise BenchArgumentError(f"{flag} {value}: must be at least {low}. Fix: {fix}")
    if bad := [e for e in args.eps if not 0 < e <= 1]:
        raise BenchArgumentError(f"--eps {' '.join(f'{e:g}' for e in bad)}: ε is a share of explained variance, in "
                                 "(0, 1]. Fix: e.g. --eps 0.4 0.8")
    wanted = [("--model", "model", [args.model]), ("--methods", "method", args.methods),
              ("--hardware", "hardware", [args.hardware]), ("--data", "dataset", [] if args.data == "noise" else
                                                              [args.data])]
    for flag, group, names in wanted:
        known = choices(group)
        if unknown := [n for n in names if n not in known]:
            extra = " or noise" if flag == "--data" else ""
            raise BenchArgumentError(f"{flag} {' '.join(unknown)}: there is no conf/{group}/{unknown[0]}.yaml. Fix: "
                                     f"{flag} <{'any' if flag == '--methods' else 'one'} of {', '.join(known)}>{extra}")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise BenchArgumentError(f"--checkpoint {args.checkpoint}: there is no such file. Fix: --checkpoint "
                                 "/path/to/weights.safetensors, or leave it out")
    if args.profile_baseline is not None and not args.profile_baseline.is_file():
        raise BenchArgumentError(f"--profile-baseline {args.profile_baseline}: there is no such file. Fix: the "
                                 "profile.csv of an earlier --measure profile run, or leave it out")
    if args.profile_baseline is not None and "profile" not in args.measure:
        raise BenchArgumentError("--profile-baseline compares profiles, and --measure has no profile. Fix: add "
                                 "--measure profile, or leave --profile-baseline out")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags, after those of `--preset NAME` (PRESETS) when given: later flags override the preset's."""
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset", choices=sorted(PRESETS), default=None)
    chosen, rest = preset.parse_known_args(argv)
    argv = [*PRESETS.get(chosen.preset or "", []), *rest]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[preset],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_b32", help="conf/model choice")
    p.add_argument("--methods", nargs="+", default=["vanilla", "wasi"], help="conf/method choices")
    p.add_argument("--eps", nargs="+", type=float, default=list(EPS_SET),
                   help="method.epsilon of the methods it matters to (epsilon_act follows it unless --set)")
    p.add_argument("--recompute", nargs="+", choices=list(wasi.config.RECOMPUTE), default=None,
                   help="method.recompute modes to compare (default: each method's own); a method without one is "
                   "measured with its nearest mode, and the table says so")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--data", default="shapes", help="conf/dataset choice for the batch, or 'noise' (Gaussian)")
    p.add_argument("--spectrum", choices=get_args(Spectrum), default="random",
                   help="target weights as initialised, or with the pretrained-like spectrum "
                   "(experiments.builders.spectrum)")
    p.add_argument("--checkpoint", default=None, help="local weights file (model.checkpoint)")
    p.add_argument("--hub", action="store_true", help="pretrained weights from the hub (model.pretrained=true)")
    p.add_argument("--hardware", default="cpu", help="conf/hardware choice")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the hardware config's)")
    p.add_argument("--measure", nargs="+", choices=["cost", "time", "energy", "profile"], default=["cost"],
                   help="profile: the share of a step in the library's Tucker step, compressed gradient and "
                   "factored update; energy: joules per training step and per inference, read around the timed "
                   "calls of --measure time's rounds (NVML, RAPL or a Jetson's rails; one line if none is readable)")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off",
                   help="torch.compile the training model of every variant for time/profile (on), or measure each "
                   "variant eagerly and compiled side by side, interleaved (both)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    p.add_argument("--profile-baseline", type=Path, default=None,
                   help="profile.csv of the same command run on other code (e.g. before a change): the summary's "
                   "profile table shows before → after")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    p.add_argument("--reps", type=int, default=10, help="timed rounds")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="Hydra overrides for every variant (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="default: <--out-root>/<--tag or timestamp>")
    p.add_argument("--out-root", type=Path, default=Path("outputs/bench"))
    p.add_argument("--tag", default=None)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Build, measure and write every variant; returns the output folder."""
    args = parse_args(argv)
    check_args(args)
    out = args.out or args.out_root / (args.tag or datetime.now().strftime("%Y%m%d-%H%M%S"))
    base = base_overrides(args)
    probe = compose_cfg([*base, f"method={args.methods[0]}"])  # --set may name keys of a method
    checkpoint = probe.model.get("checkpoint")  # --checkpoint, or the model config's own (vit_tiny_pretrained)
    if args.spectrum == "pretrained" and (checkpoint or args.hub):
        raise BenchArgumentError(f"--spectrum pretrained stands in for real weights, and --model {args.model} loads "
                                 f"{checkpoint or 'hub weights'}. Fix: drop --spectrum pretrained")
    if args.data != "noise":
        check_inputs(probe.model, probe.dataset)  # an image model with a text dataset, or the other way round
    device = setup_hardware(probe.hardware)
    x, y, num_classes = make_batch(probe, args.batch, args.data)
    x, y = to_device((x, y), device)
    specs = variant_specs(args, base)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(dict.fromkeys(n for spec in specs for n in spec.notes))
    vanilla = [s.label for s in specs if s.method == "vanilla" and s.recompute in (None, "none")]
    reference = (vanilla or [specs[0].label])[0]
    weights = (f"checkpoint {checkpoint}" if checkpoint else "pretrained (hub)" if args.hub else
               {"random": "random init", "pretrained": "random init with a pretrained-like spectrum on the targets "
                "(experiments.builders.spectrum)"}[args.spectrum])
    text = probe.model.get("inputs", "image") == "text"
    items = f"sequences of {probe.model.max_length} tokens" if text else "images"
    inputs = (("random token ids" if text else "Gaussian noise") if args.data == "noise" else
              f"the first {args.batch} training {items} of dataset={args.data}"
              + (f" (tokenizer {probe.model.tokenizer})" if text else ""))
    header = (f"# Benchmark: {args.model}, batch {args.batch}\n\n`python -m experiments.bench "
              f"{shlex.join(sys.argv[1:] if argv is None else argv)}`\n\nWeights: {weights}. Inputs: {inputs}. "
              f"Device: {device}, {probe.hardware.precision}, {torch.get_num_threads()} threads. Reference for `×`: "
              f"{reference} (its value / the row's).")
    meter, timed = None, {"time", "energy"} & set(args.measure)
    if "energy" in args.measure:
        try:
            meter = open_meter(device)
            header += f"\n\nEnergy: {meter.description}; joules are means over the {args.reps} timed rounds."
        except NoEnergySensor as err:
            log.warning("energy: %s; energy is not measured, the other measures still run", err)
            header += f"\n\nEnergy: not measured ({err})."
            timed = timed - {"energy"}
    if any(spec.compiled for spec in specs):
        header += (f" Compiled rows: the training model under torch.compile (backend {args.compile_backend}), after "
                   "one eager step and the warm-up rounds; their inference is not timed.")
    header += "".join(f"\n\nNote: {note}." for note in notes)
    rows, breakdown, built = [], {}, []
    for spec in specs:
        cfg = compose_cfg(spec.overrides)
        seed_everything(cfg.seed)
        variant = build_variant(cfg, num_classes, [(x, y)], device, spectrum=args.spectrum)
        rows.append(describe(spec, variant))
        log.info("built %s", spec.label)
        if "cost" in args.measure:
            cost, breakdown[spec.label] = measure_cost(variant, cfg, x, y, device)
            rows[-1].update(cost)
        if spec.compiled:  # one eager step first: warm-start factors and gradient carriers exist, one graph to build
            train_step(variant.model.train(), variant.optimizer, x, y, cfg.trainer.grad_clip,
                       autocast(cfg.hardware, device))
            variant.model = torch.compile(variant.model, backend=args.compile_backend)
        if {"profile"} & set(args.measure) or timed:
            built.append((spec, variant, cfg))
        del variant
        gc.collect()
        table = add_ratios(pd.DataFrame(rows), reference)
        table.to_csv(out / "variants.csv", index=False)  # after every variant: a stopped run keeps what it has
    if breakdown:
        pd.DataFrame(breakdown).fillna(0).astype(int).rename_axis("source").to_csv(out / "saved_tensors.csv")
    profiled = ops = None
    baseline = None if args.profile_baseline is None else pd.read_csv(args.profile_baseline)
    if "profile" in args.measure:
        profiled, ops = profile_regions(built, x, y, device, args.warmup, args.reps)
        profiled.to_csv(out / "profile.csv", index=False)
        ops.to_csv(out / "ops.csv", index=False)
    if timed:
        raw = time_round_robin(built, x, y, device, args.warmup, args.reps, meter)
        stats = timing_stats(raw, reference, torch.get_num_threads())
        raw.to_csv(out / "timing_raw.csv", index=False)
        stats.to_csv(out / "timing.csv", index=False)
        plot_latency(stats, out / "latency.png")
        for phase, key in (("train_step", "time/train_step_s"), ("inference", "time/inference_s")):
            by_label = stats[stats.phase == phase].set_index("label")
            table[key], table[f"{key} ×"] = table.label.map(by_label.median_s), table.label.map(by_label.speedup)
        if meter is not None:
            joules = energy_stats(raw, reference)
            joules.to_csv(out / "energy.csv", index=False)
            for (phase, domain), group in joules.groupby(["phase", "domain"], sort=False):
                table[f"energy/{domain}/{phase}_j"] = table.label.map(group.set_index("label").mean_j)
        table = add_efficiency(table)
        table.to_csv(out / "variants.csv", index=False)
    (out / "summary.md").write_text(markdown(table, breakdown, header, profiled, baseline, ops))
    (out / "run.json").write_text(json.dumps({"argv": list(sys.argv[1:] if argv is None else argv),
                                              "environment": environment(device), "reference": reference,
                                              "weights": weights, "inputs": inputs, "notes": notes}, indent=2))
    log.info("wrote %s", out)
    return out


def cli(argv: Sequence[str] | None = None) -> None:
    """`python -m experiments.bench`: `main`, then its summary.md on stdout. A wrong flag, or a --set override
    that does not compose, ends with one line on stderr and exit status 2; Ctrl-C with one line and 130
    (variants.csv holds every variant built so far)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        out = main(argv)
    except KeyboardInterrupt:
        errors.stop("interrupted by Ctrl-C (SIGINT): variants.csv in the output folder holds every variant built so "
                    "far (with its cost under --measure cost)", errors.INTERRUPTED)
    except Exception as err:
        if errors.status(err) != errors.SETTING:
            raise
        errors.stop(errors.one_line(err), errors.SETTING)
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    cli()
