"""Dense product rates on this CPU: torch's own GEMM against oneDNN's linear, on a training step's products.

    python -m experiments.gemm --threads 2 --out results/gemm/<machine>

A linear layer y = x Wᵀ + b over T tokens (x: (T, in), W: (out, in)) does three products per training step: the
forward, the input gradient dy W and the weight gradient dyᵀ x. A dense model runs them as autograd does
(`aten` rows: F.linear, dy @ W, dy.T @ x, which PyTorch's x86 builds hand to MKL); WASI runs its factor products
through `wasi.functional.factor_product` (`onednn` rows: oneDNN's linear on a float32 CPU). Both run on the same
tensors, checked equal first, and are timed interleaved (repetition r of every product and backend in turn, one
call each); the median is kept. FLOPs come from `experiments.measurement.metrics.flop_counter`, as every FLOP
figure of this project does. Writes gemm.csv (one row per product and backend, and a `step` row per backend: the
sum over one forward, input gradient and weight gradient of every --linear, times --blocks), summary.md and run.json.
Defaults: ViT-B/32's four linear layers (qkv, attention projection, fc1, fc2) at batch 32 (T = 32 · 50 tokens).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from experiments.measurement.environment import environment
from experiments.measurement.metrics import flop_counter
from wasi.functional import factor_product

log = logging.getLogger(__name__)

Product = dict[str, Callable[[], torch.Tensor]]  # backend -> a call that returns the product


def products(tokens: int, shape: tuple[int, int], generator: torch.Generator) -> dict[str, Product]:
    """The three products of a linear layer `shape` = (in, out) over `tokens` tokens, through each backend."""
    fan_in, fan_out = shape
    x, dy = torch.randn(tokens, fan_in, generator=generator), torch.randn(tokens, fan_out, generator=generator)
    w, b = torch.randn(fan_out, fan_in, generator=generator), torch.randn(fan_out, generator=generator)
    name = f"{fan_in}→{fan_out}"
    return {f"forward {name}": {"aten": lambda: F.linear(x, w, b), "onednn": lambda: factor_product(x, w, b)},
            f"input grad {name}": {"aten": lambda: dy @ w, "onednn": lambda: factor_product(dy, w.T)},
            f"weight grad {name}": {"aten": lambda: dy.T @ x, "onednn": lambda: factor_product(dy.T, x.T)}}


def flops(call: Callable[[], torch.Tensor]) -> int:
    counter = flop_counter()
    with counter:
        call()
    return counter.get_total_flops()


def measure(table: dict[str, Product], warmup: int, reps: int, blocks: int) -> pd.DataFrame:
    """One row per (product, backend): FLOPs, median seconds, GFLOP/s and aten's median over this one; then a
    `step` row per backend summing every product's median and FLOPs, times `blocks`. Refuses backends whose
    products differ (float32 tolerance)."""
    for name, calls in table.items():
        ref = calls["aten"]()
        for backend, call in calls.items():
            if not torch.allclose(call(), ref, rtol=1e-4, atol=1e-3 * float(ref.abs().max())):
                raise RuntimeError(f"{backend}'s {name} differs from aten's: the comparison would be meaningless")
    seconds: dict[tuple[str, str], list[float]] = {(n, b): [] for n, calls in table.items() for b in calls}
    for r in range(warmup + reps):
        for (name, backend), times in seconds.items():
            start = time.perf_counter()
            table[name][backend]()
            if r >= warmup:
                times.append(time.perf_counter() - start)
    rows = [{"product": name, "backend": backend, "flops": flops(table[name][backend]),
             "median_s": statistics.median(times)} for (name, backend), times in seconds.items()]
    frame = pd.DataFrame(rows)
    step = frame.groupby("backend", sort=False)[["flops", "median_s"]].sum().mul(blocks).reset_index()
    frame = pd.concat([frame, step.assign(product=f"step ({blocks} blocks)")], ignore_index=True)
    frame["gflop_s"] = frame.flops / frame.median_s / 1e9
    aten = frame[frame.backend == "aten"].set_index("product").median_s
    frame["aten_s / this"] = frame["product"].map(aten) / frame.median_s
    return frame


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.gemm", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32 * 50, help="rows of x: batch × tokens per item")
    parser.add_argument("--linear", nargs="+", default=["768x2304", "768x768", "768x3072", "3072x768"],
                        help="linear layers as INxOUT")
    parser.add_argument("--blocks", type=int, default=12, help="blocks whose linears the step row sums")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        args.shapes = [tuple(int(n) for n in s.split("x")) for s in args.linear]
    except ValueError:
        parser.error(f"--linear takes INxOUT sizes such as 768x3072, got {args.linear}")
    if any(len(s) != 2 or min(s) < 1 for s in args.shapes) or min(args.tokens, args.blocks, args.reps) < 1:
        parser.error("--linear takes INxOUT with positive sizes; --tokens, --blocks and --reps must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    if not torch._C._has_mkldnn:
        raise SystemExit(f"experiments.gemm: this PyTorch ({torch.__version__}) is built without oneDNN, so there "
                         "is nothing to compare. Fix: a PyTorch wheel from PyPI")
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    table = {name: calls for shape in args.shapes for name, calls in products(args.tokens, shape, generator).items()}
    frame = measure(table, args.warmup, args.reps, args.blocks)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "gemm.csv", index=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    env = environment(torch.device("cpu"))
    (args.out / "run.json").write_text(json.dumps({"argv": argv, "environment": env}, indent=2))
    shown = frame.assign(ms=frame.median_s * 1e3).drop(columns=["median_s", "flops"])
    (args.out / "summary.md").write_text(
        f"# Dense product rates\n\n`python -m experiments.gemm {' '.join(argv)}`\n\nCPU: {env['machine']['cpu']}, "
        f"{torch.get_num_threads()} threads; T = {args.tokens} tokens; medians of {args.reps} interleaved calls.\n\n"
        + shown.to_markdown(index=False, floatfmt=".2f") + "\n")
    log.info("wrote %s", args.out)
    return args.out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    main()
