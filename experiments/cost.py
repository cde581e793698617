"""Cost of vanilla vs subspace fine-tuning at several ε, in one process: the issue's measurement.

    python -m experiments.cost --model vit_b32 --batch 128 --eps 0.4 0.5 0.6 0.7 0.8 0.9 \
        [--methods wasi asi wsi] [--checkpoint PATH] [--no-timing] [--out results/cost/<tag>]

Each (method, ε) is built exactly as a training run builds it (Hydra compose of conf/ with
`model=<model> method=<m> method.epsilon=ε method.epsilon_act=ε trainer.batch_size=<B>`,
`experiments.models.build_model`, `hydra.utils.instantiate(cfg.method)`, `method.apply`,
`method.build_optimizer`) and measured by `experiments.run.measure` on one shared batch, so every
number comes from the same functions as a training run's results.json. Writes `cost.csv`
(one row per configuration, raw values), `cost.md` (tables) and `saved_tensors.csv` (the bytes
autograd saves in one training forward, grouped by the module and backward op that hold them).

Without --checkpoint the weights are random (`model.pretrained=false`; pretrained weights are not
downloadable offline): the weight ranks K then come from nearly flat random-init spectra and are far
larger than a pretrained model's at the same ε. --no-timing sets `trainer.timing_repeats=1` (measure()
still runs its 2 warm-up + 1 timed step and inference) and leaves the time/* columns out.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import shlex
import sys
from collections import defaultdict
from contextlib import AbstractContextManager
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn

from experiments import run
from experiments.data import build_datasets
from experiments.models import build_model

log = logging.getLogger(__name__)

CONF = Path(__file__).resolve().parents[1] / "conf"
LAYERS = "memory/compressed_layers_bytes"
LAYERS_DENSE = "memory/compressed_layers_vanilla_bytes"
COMPARED = ["memory/activation_bytes", "memory/peak_bytes", "memory/weight_bytes", "flops/train_step",
            "flops/inference_per_image", "time/train_step_s", "time/inference_per_image_s"]

Batch = tuple[torch.Tensor, torch.Tensor]


def compose_cfg(overrides: list[str]) -> DictConfig:
    """The training config for these overrides (conf/config.yaml composed as train.py does)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def make_batch(cfg: DictConfig, size: int, data: str) -> Batch:
    """x: (size, 3, S, S), y: (size,): the first `size` training images of cfg.dataset, or seeded N(0, 1) noise."""
    if data == "random":
        g = torch.Generator().manual_seed(cfg.seed)
        s = cfg.model.image_size
        return torch.randn(size, 3, s, s, generator=g), torch.randint(0, cfg.dataset.num_classes, (size,), generator=g)
    train = build_datasets(cfg.dataset, cfg.model.image_size, cfg.seed).train
    x, y = zip(*(train[i] for i in range(size)))
    return torch.stack(x), torch.tensor(y)


def measure_config(overrides: list[str], batch: Batch) -> tuple[dict, dict[str, int]]:
    """Build one configuration and measure it: (flat row, saved-activation bytes per source)."""
    cfg = compose_cfg(overrides)
    device = run.setup_hardware(cfg.hardware)
    run.seed_everything(cfg.seed)
    batch = (batch[0].to(device), batch[1].to(device))
    model = build_model(cfg.model, cfg.dataset.num_classes).to(device)
    method = hydra.utils.instantiate(cfg.method)
    summary = method.apply(model, [batch], device)
    optimizer = method.build_optimizer(model, hydra.utils.instantiate(cfg.optimizer))
    amp = run.autocast(cfg.hardware, device)
    log.info("measuring %s", " ".join(overrides))
    metrics = run.measure(model, method, optimizer, batch, cfg, device, amp)
    layers = summary.get("layers", [])
    ks = [l["weight_rank"] for l in layers if l["weight_rank"] is not None]
    row = {"method": cfg.method.name, "epsilon": cfg.method.get("epsilon") if layers else None,
           "epsilon_act": cfg.method.get("epsilon_act") if layers else None,
           "K_mean": sum(ks) / len(ks) if ks else None, "K": ks or None,
           "act_ranks": [l["act_ranks"] for l in layers if l["act_ranks"] is not None] or None, **metrics}
    return row, saved_tensors_by_source(model, batch, amp)


def saved_tensors_by_source(model: nn.Module, batch: Batch, amp: AbstractContextManager) -> dict[str, int]:
    """Bytes autograd saves in one training forward + cross-entropy loss, keyed "<module> (<type>) / <op>".

    <module> is the innermost module running when the tensor was first saved, with `blocks.<i>.` dropped
    (so all blocks add up), or "(loss)" outside the model; <op> the backward nodes holding it. Each
    storage counts once at full size, for its first saver; storages of parameters and buffers are
    excluded, as in `experiments.metrics.activation_bytes`.
    """
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    names = {m: re.sub(r"blocks\.\d+\.", "", n) or "model" for n, m in model.named_modules()}
    stack: list[nn.Module] = []
    saved: dict[int, tuple[torch.UntypedStorage, str]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if not isinstance(t, nn.Parameter) and s.data_ptr() not in params and s.data_ptr() not in saved:
            saved[s.data_ptr()] = (s, f"{names[stack[-1]]} ({type(stack[-1]).__name__})" if stack else "(loss)")
        return t

    def enter(module: nn.Module, args: tuple) -> None:
        stack.append(module)

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        stack.pop()

    hooks = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
            loss = F.cross_entropy(model(batch[0]), batch[1])
    finally:
        for h in hooks:
            h.remove()
    ops = _saving_ops(loss.grad_fn)
    out: dict[str, int] = defaultdict(int)
    for key, (storage, where) in saved.items():
        out[f"{where} / {'+'.join(sorted(ops.get(key, '?')))}"] += storage.nbytes()
    return dict(out)


def _saving_ops(root: torch.autograd.graph.Node | None) -> dict[int, set[str]]:
    """Storage pointer -> names of the backward nodes (reachable from `root`) that saved a tensor on it."""
    ops: dict[int, set[str]] = defaultdict(set)
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "saved_tensors"):  # custom autograd.Function
            tensors = list(node.saved_tensors)
        else:
            tensors = [getattr(node, a) for a in dir(node) if a.startswith("_saved_")]
        for item in tensors:
            for t in item if isinstance(item, (list, tuple)) else [item]:
                if isinstance(t, torch.Tensor):
                    ops[t.untyped_storage().data_ptr()].add(node.name().removesuffix("Backward0"))
        todo.extend(f for f, _ in node.next_functions)
    return ops


def add_ratios(rows: list[dict]) -> None:
    """In place: `layers/reduction` = compressed_layers_vanilla_bytes / compressed_layers_bytes (the
    paper's per-layer figure) and `<metric>/reduction` = vanilla's value / this row's (× less than vanilla)."""
    vanilla = next((r for r in rows if r["method"] == "vanilla"), None)
    for r in rows:
        if r.get(LAYERS):
            r["layers/reduction"] = r[LAYERS_DENSE] / r[LAYERS]
        for key in COMPARED:
            if vanilla is not None and r.get(key) and vanilla.get(key) is not None:
                r[f"{key}/reduction"] = vanilla[key] / r[key]


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)


def _mib(v: float | None) -> str:
    return "" if v is None else f"{v / 2**20:.1f}"


def _g(v: float | None) -> str:
    return "" if v is None else f"{v / 1e9:.2f}"


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}×"


def markdown(rows: list[dict], breakdown: dict[str, dict[str, int]], header: str) -> str:
    """cost.md: main table (MiB, GFLOPs, × less than vanilla), per-layer ranks, saved-tensor breakdown."""
    timing = any("time/train_step_s" in r for r in rows)
    cols = ["method", "ε", "K mean", "layers MiB", "layers vanilla MiB", "layers ×", "act MiB", "act ×",
            "peak MiB", "peak ×", "weights MiB", "weights ×", "train GFLOPs", "train ×", "infer GFLOPs/img",
            "infer ×"] + (["step s", "step ×", "infer ms/img", "infer time ×"] if timing else [])
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["method"], "" if r["epsilon"] is None else f"{r['epsilon']:g}",
                 "" if r["K_mean"] is None else f"{r['K_mean']:.1f}", _mib(r.get(LAYERS)), _mib(r.get(LAYERS_DENSE)),
                 _x(r.get("layers/reduction"))]
        for key, fmt in zip(COMPARED[:5], [_mib, _mib, _mib, _g, _g]):
            cells += [fmt(r.get(key)), _x(r.get(f"{key}/reduction"))]
        if timing:
            cells += [f"{r['time/train_step_s']:.2f}", _x(r.get("time/train_step_s/reduction")),
                      f"{r['time/inference_per_image_s'] * 1e3:.2f}", _x(r.get("time/inference_per_image_s/reduction"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per-layer weight ranks K and activation ranks (B, N, I modes), target layers in forward order:", ""]
    for r in rows:
        if r["K"] or r["act_ranks"]:
            lines.append(f"- {r['method']} ε={r['epsilon']:g}: K={r['K']}; act_ranks={r['act_ranks']}")
    names = list(breakdown)
    sources = sorted({s for b in breakdown.values() for s in b}, key=lambda s: -max(b.get(s, 0) for b in breakdown.values()))
    lines += ["", "Saved activations of one training forward + loss by source (MiB; all blocks summed):", "",
              "| source (module / backward op) | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for s in sources:
        lines.append(f"| {s} | " + " | ".join(_mib(breakdown[n].get(s, 0)) for n in names) + " |")
    lines.append("| total | " + " | ".join(_mib(sum(b.values())) for b in breakdown.values()) + " |")
    lines += ["", "The paper's per-layer figure (layers columns) counts only the converted linears' saved input "
              "and weights. A training step also saves what the other ops' backward needs: GELU its (B, N, 4D) "
              "input, LayerNorm its input and statistics, attention q, k, v, output and log-sum-exp, and every "
              "trainable dense linear its input; residual adds save nothing. Frozen ops before the first "
              "trainable layer save nothing (no gradient flows there); after it, frozen norms, attention and GELU "
              "still save their inputs (the gradient passes through them) while frozen linears save no activation."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_b32", help="conf/model choice")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eps", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
                   help="weight ε; also the activation ε (epsilon_act) unless --eps-act is given")
    p.add_argument("--eps-act", type=float, default=None, help="one activation ε for all rows")
    p.add_argument("--methods", nargs="+", default=["wasi"], help="subspace methods besides vanilla (wasi, asi, wsi)")
    p.add_argument("--checkpoint", default=None, help="local weights file (model.checkpoint)")
    p.add_argument("--data", choices=["shapes", "random"], default="shapes",
                   help="the batch: first images of conf/dataset/shapes (offline), or N(0, 1) noise")
    p.add_argument("--no-timing", action="store_true", help="timing_repeats=1 and no time/* columns")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra Hydra overrides, e.g. hardware=cuda")
    p.add_argument("--out", default=None, help="output folder (default results/cost/<model>_bs<batch>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Measure every configuration; returns the output folder (cost.csv, cost.md, saved_tensors.csv)."""
    args = parse_args(argv)
    out = Path(args.out or f"results/cost/{args.model}_bs{args.batch}")
    out.mkdir(parents=True, exist_ok=True)
    weights = [f"model.checkpoint={args.checkpoint}"] if args.checkpoint else ["model.pretrained=false"]
    base = [f"model={args.model}", f"trainer.batch_size={args.batch}", *weights, *args.set]
    base += ["trainer.timing_repeats=1"] if args.no_timing else []
    configs = [("vanilla", [*base, "method=vanilla"])]
    for m in args.methods:
        for eps in args.eps:
            act = [] if m == "wsi" else [f"method.epsilon_act={args.eps_act if args.eps_act is not None else eps}"]
            configs.append((f"{m} ε={eps:g}", [*base, f"method={m}", f"method.epsilon={eps}", *act]))
    cfg = compose_cfg(base)
    device = run.setup_hardware(cfg.hardware)
    source = (f"checkpoint {args.checkpoint}" if args.checkpoint else
              "random init (model.pretrained=false): K comes from random-init spectra, which are nearly flat "
              "and need much larger K than pretrained weights at the same ε")
    header = (f"# Cost: {args.model}, batch {args.batch} ({args.data} images), torch {torch.__version__}, "
              f"{device} {cfg.hardware.precision}, threads={torch.get_num_threads()}\n\n`python -m experiments.cost "
              f"{shlex.join(sys.argv[1:] if argv is None else argv)}`\n\nWeights: {source}. "
              "`×` = vanilla's value / this row's. layers: the paper's count over the converted layers only "
              "(compressed S + U_m + L + R + b vs dense x + W + b; `layers ×` is their quotient). act / peak / "
              "weights: the whole training step (metrics.activation_bytes / peak_bytes / weight_bytes; the CPU "
              "peak follows live storages)." + (" Timing skipped (--no-timing)." if args.no_timing else ""))
    batch = make_batch(cfg, args.batch, args.data)
    rows, breakdown = [], {}
    for name, overrides in configs:
        row, breakdown[name] = measure_config(overrides, batch)
        rows.append({k: v for k, v in row.items() if not (args.no_timing and k.startswith("time/"))})
        rows.sort(key=lambda r: (r["method"] != "vanilla", r["method"], r["epsilon"] or 0.0))
        add_ratios(rows)
        write_csv(out / "cost.csv", rows)  # after every configuration, so a stopped run keeps what it has
        write_csv(out / "saved_tensors.csv", [{"source": s, **{n: b.get(s, 0) for n, b in breakdown.items()}}
                                              for s in sorted({s for b in breakdown.values() for s in b})])
        (out / "cost.md").write_text(markdown(rows, breakdown, header))
    log.info("wrote %s", out)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print((main() / "cost.md").read_text())
