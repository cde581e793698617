"""Test-wide settings: no network, offline W&B, one CPU thread per test (2-core CI machines); the fixtures
that several modules share. Helpers: tests/helpers.py, tests/tiny_models.py."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast instead of retrying the hub
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

import experiments.configuration.schema  # noqa: E402, F401  (registers the config schemas that conf/ extends)
from tests.helpers import METHODS, QUICK, SHAPES, compose, train  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Every test on one torch thread (small ops on a shared 2-core machine run fastest so), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def method_sweep(tmp_path_factory) -> Path:
    """`train.py -m method=vanilla,lora,svd_llm,wsi,asi,wasi` (QUICK, W&B offline), run once for the session:
    job i is METHODS[i]. The train, export and report tests read it. Under `pytest -n 2` (make test) the workers
    share one sweep: the first to need it runs it, the other waits on the lock."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this session's folder, common to its workers
    sweep, done = shared / "method_sweep", shared / "method_sweep.done"
    with FileLock(shared / "method_sweep.lock"):
        if not done.exists():
            shutil.rmtree(sweep, ignore_errors=True)
            train("-m", *QUICK, *SHAPES, "logger.mode=offline", f"method={','.join(METHODS)}",
                  f"hydra.sweep.dir={sweep}", f"paths.cache_dir={sweep}/cache")
            done.touch()
    return sweep


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the real config with overrides; the run folder is tmp_path/run (no Hydra run)."""

    def _make(*overrides: str):
        return compose(*overrides, run_dir=tmp_path / "run")

    return _make
