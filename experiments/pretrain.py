"""Pretrain `vit_tiny_cpu` on generated fractals and ship its weights: `experiment=pretrain` run by the
training loop (experiments/run.py), then the backbone file and its card.

    OMP_WAIT_POLICY=PASSIVE python -m experiments.pretrain    # the shipped recipe: conf/experiment/pretrain.yaml
    python -m experiments.pretrain trainer.epochs=2 dataset.source.train_size=4000 --out /tmp/try.safetensors

Any train.py override works. WASI fine-tunes a *pretrained* model, and no pretrained weights can be
downloaded offline, so this makes one. Writes
- `--out` (default checkpoints/vit_tiny_fractal.safetensors): every tensor of the best-validation
  weights but the classifier head, so `model.checkpoint=<it>` gives any dataset a fresh head
  (conf/model/vit_tiny_pretrained.yaml points at it);
- its card `<out>.md` beside it: the run's settings, per-epoch history, accuracy, times, versions and
  sha256, generated from the run, then the hand-written `<out stem>.notes.md` (if present) included
  verbatim at its end; generation reads that file and never writes it;
- the run folder `--run-dir` (default outputs/pretrain/<out stem>): best.safetensors (with the fractal
  head), last.ckpt, results.json and metrics.jsonl, as any run; a folder that holds an earlier run is
  refused as train.py refuses it (the override overwrite=true regenerates into it, resume=true continues it).

OMP_WAIT_POLICY=PASSIVE changes no number, only how idle OpenMP threads wait: on a machine whose
cores are shared with other jobs, the default busy-waiting made 2 threads 2.3x slower (measured).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors.torch import load_file, save_file

from experiments import CONF_DIR, REPO_ROOT
from experiments.builders.models import build_model, head_prefix
from experiments.configuration.overrides import flatten
from experiments.measurement.environment import environment
from experiments.run import run

log = logging.getLogger("experiments.pretrain")

DEFAULT_OUT = REPO_ROOT / "checkpoints" / "vit_tiny_fractal.safetensors"
#: The settings the card lists: config keys, or prefixes of them.
CARD_SETTINGS = ("seed", "dataset.num_classes", "dataset.source.", "trainer.", "optimizer.", "scheduler.",
                 "hardware.threads")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="train.py overrides of experiment=pretrain, e.g. trainer.epochs=2")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="backbone weights (.safetensors); card beside it")
    p.add_argument("--run-dir", type=Path, default=None, help="the run folder (default outputs/pretrain/<out stem>)")
    return p.parse_args(argv)


def compose_recipe(overrides: list[str], run_dir: Path) -> DictConfig:
    """conf/config.yaml with experiment=pretrain and `overrides`, running in `run_dir`."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=pretrain", *overrides])
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    return cfg


def backbone(cfg: DictConfig, run_dir: Path) -> dict:
    """The run's best weights without the classifier head's tensors."""
    head = head_prefix(build_model(cfg.model, cfg.dataset.num_classes)) + "."
    return {k: v.contiguous() for k, v in load_file(str(run_dir / "best.safetensors")).items()
            if not k.startswith(head)}


def history(run_dir: Path) -> list[dict[str, Any]]:
    """Per epoch (metrics.jsonl): the mean training loss over its steps, its last step, the held-out accuracy."""
    losses: dict[int, list[float]] = defaultdict(list)
    rows: dict[int, dict[str, Any]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        row = rows.setdefault(entry["epoch"], {"epoch": entry["epoch"] + 1})
        if "train/loss" in entry:
            losses[entry["epoch"]].append(entry["train/loss"])
            row["step"] = entry["step"]
        if "val/acc" in entry:
            row["val_acc"] = entry["val/acc"]
    return [{**rows[e], "train_loss": sum(losses[e]) / len(losses[e])} for e in sorted(rows)]


def display(path: Path) -> str:
    """`path` relative to the repository root where it is inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def write_card(path: Path, out: Path, cfg: DictConfig, results: dict, epochs: list[dict], command: str,
               times: dict) -> None:
    """The card: what the file is, the result, the per-epoch history, how it was made; then the notes file."""
    evaluated = [e for e in epochs if "val_acc" in e]
    best = max(evaluated, key=lambda e: e["val_acc"])  # the first of equals, as the loop keeps it
    accuracy = {e["epoch"]: f"{100 * e['val_acc']:.1f}" for e in evaluated}
    rows = "\n".join(f"| {e['epoch']} | {e['step']} | {e['train_loss']:.4f} | {accuracy.get(e['epoch'], '')} |"
                     for e in epochs)
    config = flatten(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    settings = "\n".join(f"| `{k}` | {v} |" for k, v in config.items()
                         if k.startswith(CARD_SETTINGS) and not k.rpartition(".")[2].startswith("_"))
    v = environment()["versions"]
    m, source, tc = cfg.model, cfg.dataset.source, cfg.trainer
    notes = out.with_name(out.stem + ".notes.md")
    text = f"""# `{out.name}`: `{m.name}` pretrained on generated fractals

The `model={m.name}` architecture (timm `{m.timm_name}` with {dict(m.kwargs)}) trained from seed
{cfg.seed} to classify {cfg.dataset.num_classes} FractalDB-style classes (`experiments/data/fractals.py`:
one random iterated function system of 2-8 affine maps per class, accepted by a filling-rate check;
instances jitter its maps and vary colour, placement and flips). No download is involved: the data are
generated from `dataset.source.seed`.

The file holds every tensor except the classifier head, so `model.checkpoint={display(out)}` (or
`model=vit_tiny_pretrained`) loads it into `{m.name}` with a fresh head for the target classes. Inputs:
RGB {m.image_size}×{m.image_size}, `(x / 255 - mean) / std` per channel with mean {list(cfg.dataset.mean)},
std {list(cfg.dataset.std)}.

## Result

- best held-out accuracy (the fractals' `test` split, {source.test_size} images, {cfg.dataset.num_classes}
  classes, chance {100 / cfg.dataset.num_classes:.1f}%): **{100 * results['val/acc']:.1f}%** at epoch
  {best['epoch']}/{tc.epochs}
- {results['train/steps']} optimizer steps of batch {tc.batch_size} ({tc.epochs} epochs of {source.train_size} images)

| epoch | step | train loss (mean) | held-out acc % |
|---|---|---|---|
{rows}

## How it was made

```bash
{command}
```

- whole command: {times['wall_s'] / 60:.1f} min wall, {times['cpu_s'] / 60:.1f} min CPU (user + system,
  this process), {cfg.hardware.threads} threads
- versions: Python {v['python']}, torch {v['torch']}, timm {v['timm']}, numpy {v['numpy']},
  safetensors {v['safetensors']}
- sha256 of `{out.name}`: `{times['sha256']}`

| setting | value |
|---|---|
{settings}

## Regenerating

Run the command above from the repository root. It writes `{display(out)}` and this card, and the run
folder (`--run-dir`). The data are bit-identical for the same settings (numpy, seeded per image);
training is deterministic for a given torch version, CPU and thread count, but a different thread
count or CPU may change the last bits of the float sums and so the weights and the sha256.
"""
    if notes.is_file():
        text += (f"\nThe sections below are `{display(notes)}`, written by hand and included here; regenerating "
                 f"the card keeps them.\n\n{notes.read_text()}")
    path.write_text(text)


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    args = parse_args(argv)
    out = args.out.resolve()
    run_dir = (args.run_dir or REPO_ROOT / "outputs" / "pretrain" / out.stem).resolve()
    wall0 = time.perf_counter()
    cfg = compose_recipe(args.overrides, run_dir)
    results = run(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(backbone(cfg, run_dir), str(out), metadata={"format": "pt", "overrides": json.dumps(args.overrides)})
    usage = resource.getrusage(resource.RUSAGE_SELF)
    times: dict[str, Any] = {"wall_s": time.perf_counter() - wall0, "cpu_s": usage.ru_utime + usage.ru_stime,
             "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_WAIT_POLICY",) if k in os.environ)
    args_text = shlex.join(argv if argv is not None else sys.argv[1:])
    command = f"{env}python -m experiments.pretrain {args_text}".strip()
    write_card(out.with_suffix(".md"), out, cfg, results, history(run_dir), command, times)
    log.info("wrote %s (sha256 %s) and %s; held-out acc %.4f; %.1f min wall, %.1f min CPU", out, times["sha256"],
             out.with_suffix(".md"), results["val/acc"], times["wall_s"] / 60, times["cpu_s"] / 60)
    return out


if __name__ == "__main__":
    main()
