"""What the tests share: paths, the tiny run settings, composing the real config, and running train.py as a
user would (a subprocess, offline). Tiny models: tests/tiny_models.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
#: The environment of every subprocess a test starts: offline, quiet, one OpenMP thread that sleeps when idle (tests
#: run two at a time on 2-core machines, `pytest -n 2`; a spinning second thread would slow the other test down).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
       "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
METHODS = ["vanilla", "lora", "svd_llm", "wsi", "asi", "wasi"]
#: A short run of the tiny model (2 blocks, 6 steps, 2 evaluation batches); SHAPES: a small generated dataset.
QUICK = ["model=vit_tiny_cpu", "model.kwargs.depth=2", "trainer.epochs=2", "trainer.batch_size=16",
         "trainer.max_steps=6", "trainer.eval_batches=2", "trainer.timing_repeats=1"]
SHAPES = ["dataset.source.train_size=160", "dataset.source.test_size=64"]


def compose(*overrides: str, run_dir: Path | None = None, hydra: bool = False) -> DictConfig:
    """conf/config.yaml composed with `overrides`, as train.py composes it. run_dir: the run folder and, beside
    it, the cache (as Hydra would set them for a run); hydra: keep the `hydra` node (sweeper, launcher)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=hydra)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.paths.run_dir = str(run_dir)
            cfg.paths.cache_dir = str(run_dir.parent / "cache")
    return cfg


def train(*overrides: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python train.py *overrides` in the repo root (extra environment variables: env); asserts success
    unless check=False."""
    env = {**ENV, **(env or {})}
    proc = subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def sweep_results(sweep_dir: Path) -> list[dict]:
    """results.json of every job of a multirun, in job order."""
    files = sorted(sweep_dir.glob("*/results.json"), key=lambda p: int(p.parent.name))
    return [json.loads(f.read_text()) for f in files]
