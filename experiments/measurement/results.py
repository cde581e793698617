"""A run's results: the flat dict that `results.json`, the W&B summary and `train.py`'s return value hold.

    method, model, dataset      the config's names
    val/acc, test/acc           best validation accuracy; test accuracy of those weights
    train/loss, train/steps     the last training loss; optimizer steps taken
    params/*                    parameter counts (metrics.count_parameters)
    method/*                    what the method reported when applied (per-layer ranks, ...), flattened
    flops/*, memory/*, time/*   the cost of one training step and of inference, over the whole step and over the
                                fine-tuned layers (metrics.measure; trainer.measure)
    versions/*, machine/*       library versions and the machine (environment.environment)
    config/*                    the resolved config, flattened
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from experiments.builders.variant import Variant
from experiments.configuration.overrides import flatten
from experiments.data.loaders import Loaders, first_batch
from experiments.measurement import metrics
from experiments.measurement.environment import environment
from experiments.training.checkpoint import Progress
from experiments.training.storage import atomic, resume_fix


def assemble_results(cfg: DictConfig, config: dict, variant: Variant, progress: Progress, test_acc: float,
                     loaders: Loaders, amp: contextlib.AbstractContextManager,
                     write_to: Path | None = None) -> dict[str, Any]:
    """The results of a trained `variant` (holding its best weights) of the run `cfg` (`config`: resolved),
    where training ended at `progress`. With `trainer.measure`, measures the cost on the first training batch,
    which takes optimizer steps: call it last, on every process (SubspaceSGD steps are collectives).

    write_to: the results.json to write (rank 0's), once before the measurement and again after it, so a run
    stopped while measuring keeps its accuracy (experiments.training.run_folder.finished tells the two apart)."""
    results: dict[str, Any] = {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "val/acc": progress.best_acc,
        "test/acc": test_acc,
        "train/loss": progress.loss,
        "train/steps": progress.step,
        **{f"params/{k}": v for k, v in metrics.count_parameters(variant.model).items()},
        **{f"method/{k}": v for k, v in flatten(variant.summary).items()},
    }
    for group, values in environment(loaders.device).items():
        results.update({f"{group}/{k}": v for k, v in values.items()})
    results.update({f"config/{k}": v for k, v in flatten(config).items()})
    if write_to is not None:
        write_results(write_to, results)
    if cfg.trainer.measure:
        x, y = first_batch(loaders.train, loaders.device)
        results.update(metrics.measure(variant, x, y, grad_clip=cfg.trainer.grad_clip, amp=amp, device=loaders.device,
                                       repeats=cfg.trainer.timing_repeats))
        if write_to is not None:
            write_results(write_to, results)
    return results


def write_results(path: Path, results: dict[str, Any]) -> None:
    """One flat JSON object (NaN/inf as null), written atomically (experiments.training.storage), so a crash or a
    full disk never leaves half a file."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in results.items()}
    with atomic(path, resume_fix(path.parent)) as tmp:
        tmp.write_text(json.dumps(clean, indent=2, sort_keys=True))

