"""Test-wide settings: no network, offline W&B, a small thread count for 2-core CI machines."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast instead of retrying the hub
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

import experiments.config  # noqa: E402, F401  (registers the config schemas that conf/ extends)

CONF = str(Path(__file__).resolve().parents[1] / "conf")


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
