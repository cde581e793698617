"""The training loop, top to bottom: build, resume, train, evaluate, keep the best, checkpoint, test,
measure, log.

One process, or N under `torchrun --nproc_per_node=N train.py ...` (experiments/training/distributed.py:
DDP, global batch N × trainer.batch_size, rank 0 alone logs and writes files). `last.ckpt` in the
run folder is written every epoch, every `trainer.checkpoint_every` steps and on SIGINT/SIGTERM;
`resume=true` continues from it exactly (experiments/training/checkpoint.py). Pretraining
(`experiment=pretrain`, experiments/pretrain.py) runs through this loop too.
"""
from __future__ import annotations

import contextlib
import functools
import logging

import hydra
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from experiments.builders.inputs import data_arguments, logits
from experiments.builders.variant import build_variant, train_step
from experiments.configuration.schema import validate
from experiments.data.loaders import build_loaders, to_device
from experiments.measurement.results import assemble_results
from experiments.training import distributed
from experiments.training.checkpoint import Checkpointing
from experiments.training.hardware import autocast, seed_everything, setup_hardware
from experiments.training.logger import WandbLogger
from experiments.training.signals import StopRequest

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Train and evaluate one configuration; returns (and writes) the flat results dict
    (experiments/measurement/results.py lists its keys).

    Every setting is checked first (experiments.configuration.schema.validate: ConfigError names the key and a fix),
    before anything is built or written. SIGINT/SIGTERM write last.ckpt at the next step boundary, then
    raise TrainingInterrupted (a SystemExit with status 130/143); a second SIGINT stops at once.
    """
    validate(cfg)
    with distributed.process_group(cfg.hardware.device) as ctx, StopRequest(ctx) as stop:
        return train(cfg, ctx, stop)


def train(cfg: DictConfig, ctx: distributed.Context, stop: StopRequest) -> dict:
    """The body of `run` for this process (rank ctx.rank of ctx.world_size)."""
    device = setup_hardware(cfg.hardware, ctx.local_rank)
    ckpt = Checkpointing(cfg, ctx)  # the run folder; refuses resume=true without a checkpoint, before any build
    if ckpt.finished is not None:  # resume=auto, and this run has finished already
        return ckpt.finished
    seed_everything(cfg.seed)  # the same on every rank: identical models and random streams
    tc = cfg.trainer

    # Data, model, method, optimizer, schedule. Each rank trains on its shard of every global batch; the
    # method is calibrated on the same images on every rank (the global batches of epoch 0).
    data = hydra.utils.instantiate(cfg.dataset)(**data_arguments(cfg.model), seed=cfg.seed)  # images, or tokens
    loaders = build_loaders(data, tc, ctx, cfg.seed, device)
    variant = build_variant(cfg, data.num_classes, loaders.calibration, device)
    model, optimizer = variant.model, variant.optimizer
    scheduler = hydra.utils.instantiate(cfg.scheduler)(optimizer, steps_per_epoch=len(loaders.train))
    amp = autocast(cfg.hardware, device)
    p = ckpt.restore(model, optimizer, scheduler)  # where training stands: a fresh start, or last.ckpt's
    if ckpt.best_lost:  # best.safetensors was deleted: the restored weights become the best so far
        p.best_acc = evaluate(model, loaders.val, device, amp, tc.eval_batches, ctx)
        ckpt.save_best()
    with stop.at_once():  # nothing to checkpoint while W&B starts: Ctrl-C stops there and then
        logger = WandbLogger(cfg, ckpt.run_dir, ckpt.config, run_id=p.wandb_run_id, step=p.step, enabled=ctx.is_main)
    p.wandb_run_id = logger.run_id
    ddp_model = distributed.wrap(model, ctx)
    step = functools.partial(train_step, ddp_model, optimizer, grad_clip=tc.grad_clip, amp=amp, scheduler=scheduler,
                             clip=variant.method.clip_grad_norm_, label_smoothing=tc.label_smoothing)

    for epoch in range(p.epoch, loaders.epochs):
        ddp_model.train()
        for x, y in loaders.train_epoch(epoch, skip=p.batch):
            lr = optimizer.param_groups[0]["lr"]  # this step's: the scheduler moves it after the step
            loss = stop.agree(step(x, y))  # the mean over ranks
            ckpt.guard(loss, p.step)  # NonFiniteLossError
            p.advance(loss)
            logger.log({"train/loss": loss, "train/lr": lr, "epoch": epoch}, p.step)
            if stop.stopping or ckpt.due(p.step):
                ckpt.save(p)
            stop.raise_if_stopping(p.step, ckpt.how_to_resume)  # TrainingInterrupted
        if ((epoch + 1) % tc.eval_interval == 0 or epoch + 1 == loaders.epochs) and p.evaluated < p.step:
            val_acc = evaluate(model, loaders.val, device, amp, tc.eval_batches, ctx)
            log.info("epoch %d step %d loss %.4f val/acc %.4f", epoch + 1, p.step, p.loss, val_acc)
            logger.log({"val/acc": val_acc, "epoch": epoch}, p.step)
            p.evaluated = p.step
            if val_acc > p.best_acc:
                p.best_acc = val_acc
                ckpt.save_best()
        if p.batch == len(loaders.train):  # cut by trainer.max_steps, the epoch stays open: a resume continues it
            p.finish_epoch()
        ckpt.save(p)
    stop.release()  # from here on SIGINT/SIGTERM act as usual: last.ckpt holds the finished training
    distributed.check_replicas_equal(model, ctx)

    # Test the best model, then measure cost on it (this mutates its weights, so it comes last).
    ckpt.load_best(model)
    test_acc = evaluate(model, loaders.test, device, amp, tc.eval_batches, ctx)
    results = assemble_results(cfg, ckpt.config, variant, p, test_acc, loaders, amp,
                               write_to=ckpt.run_dir / "results.json" if ctx.is_main else None)
    if ctx.is_main:
        logger.finish(results)
        log.info("test/acc %.4f  (results: %s)", test_acc, ckpt.run_dir / "results.json")
    return results


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: contextlib.AbstractContextManager,
             max_batches: int | None, ctx: distributed.Context = distributed.Context()) -> float:
    """Top-1 accuracy over the loader (or its first max_batches batches), summed over ranks' shards; batches of
    images or of token ids (experiments.builders.inputs)."""
    model.eval()
    correct = total = 0
    for i, batch in enumerate(tqdm(loader, desc="eval", leave=False, disable=not ctx.is_main)):
        if max_batches is not None and i >= max_batches:
            break
        x, y = to_device(batch, device)
        with amp:
            pred = logits(model, x).argmax(-1)
        correct += int((pred == y).sum())
        total += y.numel()
    model.train()
    right, seen = distributed.all_sum([correct, total], ctx, device)
    return right / max(seen, 1)
