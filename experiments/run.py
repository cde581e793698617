"""The training loop, top to bottom: build, train, evaluate, keep the best, test, measure, log."""
from __future__ import annotations

import contextlib
import logging
import math
import platform
import random
from importlib.metadata import version
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import wasi
from experiments import metrics
from experiments.data import build_datasets
from experiments.logger import WandbLogger, flatten, resolved_config, write_results
from experiments.methods import first_batch
from experiments.models import build_model

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf."""


def run(cfg: DictConfig) -> dict:
    """Train and evaluate one configuration; returns (and writes) the flat results dict."""
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = setup_hardware(cfg.hardware)
    seed_everything(cfg.seed)
    tc = cfg.trainer

    # Data, model, method, optimizer.
    data = build_datasets(cfg.dataset, cfg.model.image_size, cfg.seed)
    loader = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(data.train, tc.batch_size, shuffle=True, generator=loader, num_workers=tc.num_workers)
    val_loader = DataLoader(data.val, tc.batch_size, num_workers=tc.num_workers)
    test_loader = DataLoader(data.test, tc.batch_size, num_workers=tc.num_workers)
    model = build_model(cfg.model, data.num_classes).to(device)
    method = hydra.utils.instantiate(cfg.method)
    summary = method.apply(model, train_loader, device)
    optimizer = method.build_optimizer(model, hydra.utils.instantiate(cfg.optimizer))
    base_lr = optimizer.param_groups[0]["lr"]
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=tc.epochs, eta_min=tc.min_lr_ratio * base_lr)
    amp = autocast(cfg.hardware, device)
    config = resolved_config(cfg)
    logger = WandbLogger(cfg, run_dir, config)

    # Train; evaluate every eval_interval epochs; keep the best-validation weights on disk.
    best_path, best_acc, step, loss = run_dir / "best.safetensors", -1.0, 0, float("nan")
    for epoch in range(tc.epochs):
        model.train()
        for x, y in tqdm(train_loader, desc=f"epoch {epoch + 1}/{tc.epochs}", leave=False):
            loss = train_step(model, optimizer, x.to(device), y.to(device), tc.grad_clip, amp).item()
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss} at step {step}. The best weights so far are in {best_path}. "
                    "Fix: lower optimizer.lr, set trainer.grad_clip, or use hardware.precision=fp32."
                )
            step += 1
            logger.log({"train/loss": loss, "train/lr": optimizer.param_groups[0]["lr"], "epoch": epoch}, step)
            if tc.max_steps and step >= tc.max_steps:
                break
        scheduler.step()
        done = epoch + 1 == tc.epochs or bool(tc.max_steps and step >= tc.max_steps)
        if (epoch + 1) % tc.eval_interval == 0 or done:
            val_acc = evaluate(model, val_loader, device, amp, tc.eval_batches)
            log.info("epoch %d step %d loss %.4f val/acc %.4f", epoch + 1, step, loss, val_acc)
            logger.log({"val/acc": val_acc}, step)
            if val_acc > best_acc:
                best_acc = val_acc
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(best_path))
        if done:
            break

    # Test the best model, then measure cost on it (this mutates its weights, so it comes last).
    model.load_state_dict(load_file(str(best_path), device=str(device)))
    test_acc = evaluate(model, test_loader, device, amp, tc.eval_batches)
    results = {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "val/acc": best_acc,
        "test/acc": test_acc,
        "train/loss": loss,
        "train/steps": step,
        **{f"params/{k}": v for k, v in metrics.count_parameters(model).items()},
        **{f"method/{k}": v for k, v in flatten(summary).items()},
    }
    if tc.measure:
        results.update(measure(model, method, optimizer, first_batch(train_loader, device), cfg, device, amp))
    results.update({f"versions/{k}": v for k, v in library_versions().items()})
    results.update({f"config/{k}": v for k, v in flatten(config).items()})
    write_results(run_dir / "results.json", results)
    logger.finish(results)
    log.info("test/acc %.4f  (results: %s)", test_acc, run_dir / "results.json")
    return results


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    grad_clip: float | None,
    amp: contextlib.AbstractContextManager,
) -> torch.Tensor:
    """One optimizer step on a batch x: (B, 3, H, W), y: (B,); returns the loss (detached)."""
    with amp:
        loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        wasi.clip_grad_norm_(model, grad_clip)
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp, max_batches: int | None) -> float:
    """Top-1 accuracy over the loader (or its first max_batches batches)."""
    model.eval()
    correct = total = 0
    for i, (x, y) in enumerate(tqdm(loader, desc="eval", leave=False)):
        if max_batches is not None and i >= max_batches:
            break
        with amp:
            pred = model(x.to(device)).argmax(-1)
        correct += (pred.cpu() == y).sum().item()
        total += y.numel()
    model.train()
    return correct / max(total, 1)


def measure(model: nn.Module, method, optimizer, batch, cfg: DictConfig, device: torch.device, amp) -> dict:
    """FLOPs, memory and time of one training step at the configured batch size, and of inference."""
    x, y = batch
    step = lambda: train_step(model, optimizer, x, y, cfg.trainer.grad_clip, amp)  # noqa: E731
    step()  # optimizer state exists from here on, as in any later step
    deployed = method.inference_model(model)
    out = {
        "flops/inference_per_image": metrics.inference_flops(deployed, cfg.model.image_size, device),
        "flops/train_step": metrics.train_step_flops(step),
        "memory/activation_bytes": metrics.activation_bytes(step, model),
        "memory/weight_bytes": metrics.weight_bytes(model, optimizer),
        "memory/peak_bytes": metrics.peak_bytes(step, device, model, optimizer),
        "time/train_step_s": metrics.median_time(step, repeats=cfg.trainer.timing_repeats, device=device),
        **metrics.compressed_layers_bytes(model),
    }
    deployed.eval()
    with torch.no_grad(), amp:
        per_batch = metrics.median_time(lambda: deployed(x), repeats=cfg.trainer.timing_repeats, device=device)
    model.train()
    out["time/inference_per_image_s"] = per_batch / x.shape[0]
    return out


def setup_hardware(hw: DictConfig) -> torch.device:
    if hw.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("hardware=cuda but no CUDA device is visible. Fix: run on a GPU machine or use hardware=cpu.")
    if hw.threads:
        torch.set_num_threads(hw.threads)
    return torch.device(hw.device)


def autocast(hw: DictConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if hw.precision == "fp32":
        return contextlib.nullcontext()
    if hw.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"hardware.precision must be fp32 or bf16, got {hw.precision!r}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def library_versions() -> dict:
    names = ["torch", "torchvision", "timm", "hydra-core", "wandb", "fvcore", "peft"]
    return {"python": platform.python_version(), **{n: version(n) for n in names}}
