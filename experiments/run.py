"""The training loop, top to bottom: build, resume, train, evaluate, keep the best, checkpoint, test,
measure, log.

One process, or N under `torchrun --nproc_per_node=N train.py ...` (experiments/training/distributed.py:
DDP, global batch N × trainer.batch_size, rank 0 alone logs and writes files). `last.ckpt` in the
run folder is written every epoch, every `trainer.checkpoint_every` steps and on SIGINT/SIGTERM;
`resume=true` continues from it exactly (experiments/training/checkpoint.py).
"""
from __future__ import annotations

import logging
import math
import platform
import signal
from importlib.metadata import version
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from experiments.builders.methods import first_batch
from experiments.builders.variant import build_variant, train_step
from experiments.configuration.schema import validate
from experiments.measurement import metrics
from experiments.training import checkpoint, distributed
from experiments.training.checkpoint import Progress
from experiments.training.hardware import autocast, seed_everything, setup_hardware
from experiments.training.logger import WandbLogger, flatten, resolved_config, write_results
from experiments.training.signals import StopRequest, TrainingInterrupted

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf."""


def run(cfg: DictConfig) -> dict:
    """Train and evaluate one configuration; returns (and writes) the flat results dict.

    Every setting is checked first (experiments.configuration.schema.validate: ConfigError names the key and a fix),
    before anything is built or written. SIGINT/SIGTERM write last.ckpt at the next step boundary, then
    raise TrainingInterrupted (a SystemExit with status 130/143); a second SIGINT stops at once.
    """
    validate(cfg)
    with distributed.process_group(cfg.hardware.device) as ctx, StopRequest() as stop:
        return train(cfg, ctx, stop)


def train(cfg: DictConfig, ctx: distributed.Context, stop: StopRequest) -> dict:
    """The body of `run` for this process (rank ctx.rank of ctx.world_size)."""
    device = setup_hardware(cfg.hardware, ctx.local_rank)
    run_dir = Path(distributed.broadcast(cfg.paths.run_dir, ctx))  # rank 0's: the default name holds a time
    resume_from = checkpoint.resume_path(cfg.resume, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)  # the same on every rank: identical models and random streams
    tc = cfg.trainer

    # Data, model, method, optimizer. Each rank trains on its shard of every global batch; the method
    # is calibrated on the same images on every rank (the global batches of epoch 0).
    data = hydra.utils.instantiate(cfg.dataset)(image_size=cfg.model.image_size, seed=cfg.seed)
    sampler = distributed.EpochSampler(data.train, ctx, cfg.seed)
    train_loader = DataLoader(data.train, tc.batch_size, sampler=sampler, generator=sampler.generator,
                              num_workers=tc.num_workers)
    calibration = DataLoader(data.train, tc.batch_size * ctx.world_size, num_workers=tc.num_workers,
                             sampler=distributed.EpochSampler(data.train, distributed.Context(), cfg.seed))
    val_loader = DataLoader(distributed.shard(data.val, ctx), tc.batch_size, num_workers=tc.num_workers)
    test_loader = DataLoader(distributed.shard(data.test, ctx), tc.batch_size, num_workers=tc.num_workers)
    variant = build_variant(cfg, data.num_classes, calibration, device)
    model, optimizer = variant.model, variant.optimizer
    base_lr = optimizer.param_groups[0]["lr"]
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=tc.epochs,
                                                           eta_min=tc.min_lr_ratio * base_lr)
    amp = autocast(cfg.hardware, device)
    config = resolved_config(cfg)

    # Resume: last.ckpt holds weights, optimizer, schedule, position, RNG states and the W&B run id
    # (experiments/training/checkpoint.py); the W&B run continues under that id.
    best_path, last_path = run_dir / "best.safetensors", run_dir / "last.ckpt"
    start = Progress()
    if resume_from is not None:
        start = checkpoint.load(resume_from, model, optimizer, scheduler, config, ctx.rank, ctx.world_size)
        if ctx.is_main:
            checkpoint.carry_best(resume_from, best_path, start)  # when resuming into another folder
    logger_cfg = cfg if ctx.is_main else OmegaConf.merge(cfg, {"logger": {"mode": "disabled"}})
    logger = WandbLogger(logger_cfg, run_dir, config, run_id=start.wandb_run_id)
    ddp_model = distributed.wrap(model, ctx)

    def save_checkpoint(progress: Progress) -> None:
        write_checkpoint(last_path, model, optimizer, scheduler, progress, config, ctx,
                         divergence_help(cfg, best_path, last_path))

    # Train; evaluate every eval_interval epochs; keep the best-validation weights on disk; checkpoint
    # every epoch, every checkpoint_every steps, and when a signal asks to stop.
    step, best_acc, loss = start.step, start.best_acc, start.loss
    for epoch in range(start.epoch, tc.epochs):
        if tc.max_steps and step >= tc.max_steps:
            break
        trained = start.batch if epoch == start.epoch else 0  # batches of this epoch done before a resume
        ddp_model.train()
        batches = tqdm(distributed.epoch_batches(train_loader, epoch, skip=trained), total=len(train_loader),
                       initial=trained, desc=f"epoch {epoch + 1}/{tc.epochs}", leave=False, disable=not ctx.is_main)
        for batch, (x, y) in enumerate(batches, start=trained + 1):
            loss = train_step(ddp_model, optimizer, x.to(device), y.to(device), tc.grad_clip, amp).item()
            loss, stopping = distributed.agree(loss, stop.requested, ctx, device)  # mean over ranks
            if not math.isfinite(loss):
                raise NonFiniteLossError(f"loss is {loss} at step {step}. {divergence_help(cfg, best_path, last_path)}")
            step += 1
            logger.log({"train/loss": loss, "train/lr": optimizer.param_groups[0]["lr"], "epoch": epoch}, step)
            if stopping or (tc.checkpoint_every and step % tc.checkpoint_every == 0):
                save_checkpoint(Progress(epoch, batch, step, best_acc, loss, logger.run_id))
            if stopping:
                signum = stop.signum or signal.SIGTERM  # another rank may have got the signal
                log.warning("stopped by %s at step %d; checkpoint %s. Continue with the same overrides plus "
                            "hydra.run.dir=%s resume=true", signal.Signals(signum).name, step, last_path, run_dir)
                raise TrainingInterrupted(128 + signum)
            if tc.max_steps and step >= tc.max_steps:
                break
        scheduler.step()
        done = epoch + 1 == tc.epochs or bool(tc.max_steps and step >= tc.max_steps)
        if (epoch + 1) % tc.eval_interval == 0 or done:
            val_acc = evaluate(model, val_loader, device, amp, tc.eval_batches, ctx)
            log.info("epoch %d step %d loss %.4f val/acc %.4f", epoch + 1, step, loss, val_acc)
            logger.log({"val/acc": val_acc}, step)
            if val_acc > best_acc:
                best_acc = val_acc
                if ctx.is_main:
                    checkpoint.save_weights(best_path, model.state_dict())
        save_checkpoint(Progress(epoch + 1, 0, step, best_acc, loss, logger.run_id))
        if done:
            break
    stop.release()  # from here on SIGINT/SIGTERM act as usual: last.ckpt holds the finished training
    distributed.check_replicas_equal(model, ctx)

    # Test the best model, then measure cost on it (this mutates its weights, so it comes last).
    distributed.barrier(ctx)  # rank 0 has written best.safetensors
    checkpoint.load_model_state(model, load_file(str(best_path), device=str(device)))
    test_acc = evaluate(model, test_loader, device, amp, tc.eval_batches, ctx)
    results = {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "val/acc": best_acc,
        "test/acc": test_acc,
        "train/loss": loss,
        "train/steps": step,
        **{f"params/{k}": v for k, v in metrics.count_parameters(model).items()},
        **{f"method/{k}": v for k, v in flatten(variant.summary).items()},
    }
    if tc.measure:  # on every rank (SubspaceSGD steps are collectives), per-process batch
        x, y = first_batch(train_loader, device)
        results.update(metrics.measure(variant, x, y, grad_clip=tc.grad_clip, amp=amp, image_size=cfg.model.image_size,
                                       device=device, repeats=tc.timing_repeats))
    results.update({f"versions/{k}": v for k, v in library_versions().items()})
    results.update({f"config/{k}": v for k, v in flatten(config).items()})
    if ctx.is_main:
        write_results(run_dir / "results.json", results)
        logger.finish(results)
        log.info("test/acc %.4f  (results: %s)", test_acc, run_dir / "results.json")
    return results


def write_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, progress: Progress,
                     config: dict, ctx: distributed.Context, if_not_finite: str = "") -> None:
    """last.ckpt from rank 0, with every rank's Tucker warm-start factors. Every rank calls it (collective)
    and first checks the weights are finite, so a NaN stops all ranks and keeps the previous file
    (NonFiniteWeightsError, its message ending with `if_not_finite`)."""
    checkpoint.check_finite(model, optimizer, progress.step, path, if_not_finite)
    warm_start = distributed.all_gather_objects(checkpoint.warm_start_state(model), ctx)
    if ctx.is_main:
        checkpoint.save(path, model, optimizer, scheduler, progress, warm_start, config)


def divergence_help(cfg: DictConfig, best_path: Path, last_path: Path) -> str:
    """What to tell when the loss or the weights became NaN/inf: the files this run has written so far
    and the fixes its config leaves open."""
    written = [f"{path} holds {what}" for path, what in ((best_path, "the best-validation weights so far"),
                                                          (last_path, "the last good checkpoint (not overwritten)"))
               if path.is_file()]
    fixes = [f"lower optimizer.lr (now {cfg.optimizer.lr:g})"]
    fixes += ["set trainer.grad_clip=2.0 (clipping is off)"] if cfg.trainer.grad_clip is None else []
    fixes += [f"use hardware.precision=fp32 (now {cfg.hardware.precision})"] if cfg.hardware.precision != "fp32" else []
    return f"{'; '.join(written) or 'No checkpoint was written yet'}. Fix: {', or '.join(fixes)}."


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp, max_batches: int | None,
             ctx: distributed.Context = distributed.Context()) -> float:
    """Top-1 accuracy over the loader (or its first max_batches batches), summed over ranks' shards."""
    model.eval()
    correct = total = 0
    for i, (x, y) in enumerate(tqdm(loader, desc="eval", leave=False, disable=not ctx.is_main)):
        if max_batches is not None and i >= max_batches:
            break
        with amp:
            pred = model(x.to(device)).argmax(-1)
        correct += (pred.cpu() == y).sum().item()
        total += y.numel()
    model.train()
    correct, total = distributed.all_sum([correct, total], ctx, device)
    return correct / max(total, 1)


def library_versions() -> dict:
    names = ["torch", "torchvision", "timm", "hydra-core", "wandb", "fvcore", "peft"]
    return {"python": platform.python_version(), **{n: version(n) for n in names}}
