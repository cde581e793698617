"""Test-wide settings: no network, offline W&B, a small thread count for 2-core CI machines."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast instead of retrying the hub
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

import experiments.configuration.schema  # noqa: E402, F401  (registers the config schemas that conf/ extends)
from tests.cli import train  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")
METHODS = ["vanilla", "lora", "svd_llm", "wsi", "asi", "wasi"]
#: A short run of the tiny model (2 blocks, 6 steps, 2 evaluation batches); SHAPES: a small generated dataset.
QUICK = ["model=vit_tiny_cpu", "model.kwargs.depth=2", "trainer.epochs=2", "trainer.batch_size=16",
         "trainer.max_steps=6", "trainer.eval_batches=2", "trainer.timing_repeats=1"]
SHAPES = ["dataset.source.train_size=160", "dataset.source.test_size=64"]


@pytest.fixture(scope="session")
def method_sweep(tmp_path_factory) -> Path:
    """`train.py -m method=vanilla,lora,svd_llm,wsi,asi,wasi` (QUICK, W&B offline), run once for the session:
    job i is METHODS[i]. The train, export and report tests read it."""
    sweep = tmp_path_factory.mktemp("method_sweep")
    train("-m", *QUICK, *SHAPES, "logger.mode=offline", f"method={','.join(METHODS)}", f"hydra.sweep.dir={sweep}",
          f"paths.cache_dir={sweep}/cache")
    return sweep


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the real config with overrides; run_dir points at a tmp dir (no Hydra run)."""

    def _make(*overrides: str):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
        with open_dict(cfg):
            cfg.paths.run_dir = str(tmp_path / "run")
            cfg.paths.cache_dir = str(tmp_path / "cache")
        return cfg

    return _make
