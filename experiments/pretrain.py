"""Pretrain `vit_tiny_cpu` on generated fractals (experiments/data/fractals.py) and ship its weights.

    OMP_WAIT_POLICY=PASSIVE python -m experiments.pretrain    # the shipped recipe (defaults below)
    python -m experiments.pretrain --epochs 2 --train-size 4000 --out /tmp/try.safetensors   # a quick try

WASI fine-tunes a *pretrained* model, and no pretrained weights can be downloaded offline, so this
makes one: the `model=vit_tiny_cpu` architecture (conf/model/vit_tiny_cpu.yaml) trained from a
seed on `num_classes` FractalDB-style classes. AdamW, linear warm-up then cosine decay per step,
label smoothing; the data are generated once in memory (uint8) and batched as tensors. The
weights with the best accuracy on the held-out split are kept.

Writes `--out` (default checkpoints/vit_tiny_fractal.safetensors: every tensor but the classifier
head, so `model.checkpoint=<it>` gives any dataset a fresh head; conf/model/vit_tiny_pretrained.yaml
points at it), a card `<out>.md` beside it (command, settings, accuracy, times, versions, sha256)
and, in `--run-dir`, `model.safetensors` (with the fractal head) and `history.json`.

OMP_WAIT_POLICY=PASSIVE changes no number, only how idle OpenMP threads wait: on a machine whose
cores are shared with other jobs, the default busy-waiting made 2 threads 2.3x slower (measured).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import resource
import shlex
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from experiments import REPO_ROOT
from experiments.builders.models import build_model
from experiments.data.fractals import RenderSettings, render_fractals, search_classes

log = logging.getLogger("experiments.pretrain")

MODEL_CONFIG = REPO_ROOT / "conf" / "model" / "vit_tiny_cpu.yaml"
DEFAULT_OUT = REPO_ROOT / "checkpoints" / "vit_tiny_fractal.safetensors"
MEAN, STD = 0.5, 0.5  # the normalisation of every embedded dataset config (shapes, digits, fractals)


@dataclasses.dataclass
class Recipe:
    """Every setting of a pretraining run; the defaults are the shipped checkpoint's recipe."""

    # data (experiments.data.fractals.fractals arguments)
    num_classes: int = 100
    train_size: int = 50_000
    val_size: int = 5_000
    data_seed: int = 0
    fill_rate: float = 0.2
    jitter: float = 0.05
    min_scale: float = 0.6
    trim: float = 0.01
    supersample: int = 2
    walkers: int = 64
    steps: int = 96
    # training
    seed: int = 0
    epochs: int = 16
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    threads: int | None = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(Recipe):
        kind = {"int": int, "float": float, "int | None": int}[str(field.type)]
        p.add_argument("--" + field.name.replace("_", "-"), type=kind, default=field.default)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="backbone weights (.safetensors); card beside it")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="full model, history (default outputs/pretrain/<out stem>)")
    return p.parse_args(argv)


def make_data(r: Recipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(x_train, y_train, x_val, y_val, info): images (N, 3, S, S) uint8, labels (N,) int64.

    Train is the fractals' "train" split, val their "test" split (disjoint random streams)."""
    settings = RenderSettings(resolution=32, supersample=r.supersample, walkers=r.walkers, steps=r.steps,
                              jitter=r.jitter, min_scale=r.min_scale, trim=r.trim)
    t0 = time.perf_counter()
    classes = search_classes(r.num_classes, r.data_seed, r.fill_rate)
    t1 = time.perf_counter()
    train = render_fractals(r.train_size, "train", r.data_seed, classes, settings)
    val = render_fractals(r.val_size, "test", r.data_seed, classes, settings)
    t2 = time.perf_counter()
    info = {"class_search_s": t1 - t0, "render_s": t2 - t1, "candidates": classes.candidates,
            "maps_per_class": np.bincount(classes.n_maps, minlength=9)[2:].tolist()}
    log.info("%d classes from %d candidate IFSs in %.1f s; %d + %d images in %.1f s", r.num_classes,
             classes.candidates, t1 - t0, r.train_size, r.val_size, t2 - t1)

    def tensors(split: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = split
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()

    return *tensors(train), *tensors(val), info


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 `(x / 255 - 0.5) / 0.5`, as the dataset configs' mean/std."""
    return (images.float() / 255.0 - MEAN) / STD


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on biases, norms, position embedding, class token)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = sum((model(normalise(x[i:i + batch])).argmax(-1) == y[i:i + batch]).sum().item()
                  for i in range(0, len(y), batch))
    model.train()
    return correct / len(y)


def pretrain(r: Recipe) -> tuple[nn.Module, dict]:
    """Train; returns the model holding its best-validation weights and a summary."""
    if r.threads:
        torch.set_num_threads(r.threads)
    x_train, y_train, x_val, y_val, data_info = make_data(r)
    torch.manual_seed(r.seed)
    model = build_model(OmegaConf.load(MODEL_CONFIG), r.num_classes)
    optimizer = torch.optim.AdamW(param_groups(model, r.weight_decay), lr=r.lr)
    steps_per_epoch = len(y_train) // r.batch_size  # the last incomplete batch is dropped
    total, warmup = r.epochs * steps_per_epoch, round(r.warmup_epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(r.seed)
    history, best, best_state, step = [], -1.0, None, 0
    t0 = time.perf_counter()
    for epoch in range(r.epochs):
        perm = torch.randperm(len(y_train), generator=order)
        seen = correct = 0
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * r.batch_size:(i + 1) * r.batch_size]
            x, y = normalise(x_train[idx]), y_train[idx]
            for group in optimizer.param_groups:
                group["lr"] = r.lr * lr_factor(step, total, warmup, r.min_lr_ratio)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=r.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss {loss.item()} at step {step}: lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if r.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
            optimizer.step()
            step += 1
            seen += len(y)
            correct += (logits.argmax(-1) == y).sum().item()
            loss_sum += loss.item() * len(y)
        val_acc = accuracy(model, x_val, y_val)
        entry = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                 "val_acc": val_acc, "elapsed_s": time.perf_counter() - t0}
        history.append(entry)
        log.info("epoch %d/%d  loss %.4f  train/acc %.4f  val/acc %.4f  %.0f s", epoch + 1, r.epochs,
                 entry["train_loss"], entry["train_acc"], val_acc, entry["elapsed_s"])
        if val_acc > best:
            best, best_state = val_acc, {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_s = time.perf_counter() - t0
    model.load_state_dict(best_state)
    best_epoch = max(history, key=lambda h: h["val_acc"])
    summary = {
        "data": data_info, "history": history, "train_s": train_s, "steps": step,
        "best_epoch": best_epoch["epoch"], "val_acc": best_epoch["val_acc"],
        "train_acc_eval": accuracy(model, x_train[:r.val_size], y_train[:r.val_size]),  # eval mode, no dropout
        "train_acc_running": best_epoch["train_acc"],
    }
    return model, summary


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor but the classifier head's (a fresh head is made for each fine-tuning dataset)."""
    head = next(name for name, module in model.named_modules() if module is model.get_classifier())
    return {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(head + ".")}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": version("timm"),
            "numpy": np.__version__, "safetensors": version("safetensors")}


def display(path: Path) -> str:
    """`path` relative to the repository root where it is inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def write_card(path: Path, out: Path, r: Recipe, summary: dict, command: str, times: dict) -> None:
    h = summary["history"]
    best = summary["best_epoch"]
    data = summary["data"]
    rows = "\n".join(f"| {e['epoch']} | {e['train_loss']:.4f} | {100 * e['train_acc']:.1f} | {100 * e['val_acc']:.1f} |"
                     for e in h)
    settings = "\n".join(f"| `{f.name}` | {getattr(r, f.name)} |" for f in dataclasses.fields(Recipe))
    v = versions()
    text = f"""# `{out.name}`: `vit_tiny_cpu` pretrained on generated fractals

The `model=vit_tiny_cpu` architecture (timm `VisionTransformer`: 32×32 input, 4×4 patches, width 96,
4 blocks, 3 heads) trained from seed {r.seed} to classify {r.num_classes} FractalDB-style classes
(`experiments/data/fractals.py`: one random iterated function system of 2-8 affine maps per class,
accepted by a filling-rate check; instances jitter its maps and vary colour, placement and flips).
No download is involved: the data are generated from `data_seed`.

The file holds every tensor except the classifier head (`head.weight`, `head.bias`), so
`model.checkpoint={display(out)}` (or `model=vit_tiny_pretrained`) loads it into `vit_tiny_cpu` with a
fresh head for the target classes. Inputs: RGB 32×32, `(x / 255 - 0.5) / 0.5` per channel (the
`mean`/`std` of `conf/dataset/shapes.yaml`, `digits.yaml`, `fractals.yaml`).

## Result

- best held-out accuracy (the fractals' `test` split, {r.val_size} images, {r.num_classes} classes, chance
  {100 / r.num_classes:.1f}%): **{100 * summary['val_acc']:.1f}%** at epoch {best}/{r.epochs}
- training accuracy of the same weights: {100 * summary['train_acc_eval']:.1f}% (eval mode, first
  {r.val_size} training images; {100 * summary['train_acc_running']:.1f}% running average over epoch {best})
- {summary['steps']} optimizer steps of batch {r.batch_size} ({r.epochs} epochs of {r.train_size} images)

| epoch | train loss | train acc % | held-out acc % |
|---|---|---|---|
{rows}

## How it was made

```bash
{command}
```

- class search: {data['candidates']} candidate IFSs for {r.num_classes} classes
  (maps per class 2..8: {data['maps_per_class']}), {data['class_search_s']:.1f} s;
  rendering {r.train_size} + {r.val_size} images: {data['render_s']:.1f} s
- training: {summary['train_s'] / 60:.1f} min wall
- whole command: {times['wall_s'] / 60:.1f} min wall, {times['cpu_s'] / 60:.1f} min CPU (user + system,
  this process), {r.threads} threads. The 2-core machine was shared with other jobs, so times are
  upper bounds.
- versions: Python {v['python']}, torch {v['torch']}, timm {v['timm']}, numpy {v['numpy']},
  safetensors {v['safetensors']}
- sha256 of `{out.name}`: `{times['sha256']}`

| setting | value |
|---|---|
{settings}

## Regenerating

Run the command above from the repository root. It writes `{display(out)}` and this card, and the
full model (with the {r.num_classes}-class head) plus `history.json` into `--run-dir`. The data
are bit-identical for the same settings (numpy, seeded per image); training is deterministic for
a given torch version, CPU and thread count, but a different thread count or CPU may change the
last bits of the float sums and so the weights and the sha256.
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    args = parse_args(argv)
    r = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    out = args.out.resolve()
    run_dir = (args.run_dir or REPO_ROOT / "outputs" / "pretrain" / out.stem).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    model, summary = pretrain(r)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "model.safetensors"))
    save_file(backbone_state(model), str(out), metadata={"format": "pt", "recipe": json.dumps(dataclasses.asdict(r))})
    usage = resource.getrusage(resource.RUSAGE_SELF)
    times = {"wall_s": time.perf_counter() - wall0, "cpu_s": usage.ru_utime + usage.ru_stime,
             "process_time_s": time.process_time() - cpu0, "sha256": sha256(out)}
    env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_WAIT_POLICY",) if k in os.environ)
    args_text = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    command = f"{env}python -m experiments.pretrain {args_text}"
    (run_dir / "history.json").write_text(json.dumps({"recipe": dataclasses.asdict(r), **summary, **times,
                                                      "versions": versions(), "command": command}, indent=1))
    write_card(out.with_suffix(".md"), out, r, summary, command.strip(), times)
    log.info("wrote %s (sha256 %s) and %s; held-out acc %.4f; %.1f min wall, %.1f min CPU", out, times["sha256"],
             out.with_suffix(".md"), summary["val_acc"], times["wall_s"] / 60, times["cpu_s"] / 60)
    return out


if __name__ == "__main__":
    main()
