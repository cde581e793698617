"""Logging a run's metrics: to Weights & Biases (offline by default) and to `metrics.jsonl` in its folder."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)


class WandbLogger:
    """Thin wrapper over one W&B run, and `<run_dir>/metrics.jsonl`: every `log` call appended as one JSON
    object {"step": step, **metrics}, W&B or not. `enabled=False` (every process of a job but the first)
    makes it a no-op; `logger.mode=disabled` turns W&B off.

    step: where training starts (a resumed run: its checkpoint's step). metrics.jsonl keeps what was logged
    up to that step and drops the rest, which the run logs again, so it always reads as one uninterrupted run.

    run_id: the id of the W&B run to continue (a resumed training keeps its run: last.ckpt stores the id).
    Online, W&B appends to that run; offline, each process writes its own `wandb/offline-run-*-<id>`
    folder under the same id, and `wandb sync <run dir>/wandb/offline-run-*` uploads them, in order, into
    that one run. A resumed run logs the steps after its checkpoint again, with the same values (resume is
    exact); W&B ignores a step lower than the last one it has.

    Online without a login or a network, the run logs offline instead and says so in one line: W&B's own
    `init_timeout` (logger.init_timeout, 5 s; W&B's default is 90) bounds the wait, and with it how long a
    Ctrl-C waits (wandb.init lets the interrupt through only when its wait ends). W&B runs `quiet`: without
    it, wandb.init first looks up the user's name for its "logged in as" line, which waits another 10 s
    without a network.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, config: dict, run_id: str | None = None, step: int = 0,
                 enabled: bool = True):
        self.run = None
        self.run_id = run_id  # kept when disabled, so a later resume with W&B on still finds the run
        self.history = run_dir / "metrics.jsonl" if enabled else None
        if self.history is not None:
            kept = [line for line in (self.history.read_text().splitlines() if self.history.is_file() else [])
                    if json.loads(line)["step"] <= step]
            self.history.write_text("".join(line + "\n" for line in kept))
        if not enabled or cfg.logger.mode == "disabled":
            return
        import wandb

        settings = dict(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            tags=list(cfg.logger.tags),
            dir=str(run_dir),
            config=config,
            name=f"{cfg.method.name}-{cfg.model.name}-{cfg.dataset.name}",
            reinit="finish_previous",
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(init_timeout=float(cfg.logger.init_timeout), quiet=True),
        )
        try:
            self.run = wandb.init(mode=cfg.logger.mode, **settings)
        except Exception as err:  # no login, no network: keep the run, log offline
            if cfg.logger.mode != "online":
                raise
            reason = " ".join(str(err).split("\nConsider increasing")[0].split())[:300]  # W&B's own advice: ours below
            log.warning("W&B online did not start the run within logger.init_timeout=%g s (%s: %s); logging offline "
                        "instead: sync later with `wandb sync %s/wandb/offline-run-*`, or raise logger.init_timeout "
                        "on a slow network", cfg.logger.init_timeout, type(err).__name__, reason, run_dir)
            self.run = wandb.init(mode="offline", **settings)
        self.run_id = self.run.id

    def log(self, metrics: dict, step: int) -> None:
        if self.history is not None:
            with self.history.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self, results: dict) -> None:
        """Final metrics into the run summary (the config is already in the W&B run config)."""
        if self.run is not None:
            self.run.summary.update({k: v for k, v in results.items() if not k.startswith("config/")})
            self.run.finish()
