"""W&B faults: an online init that fails (no login, no network) falls back to an offline run; an
offline or disabled logger never hides its own errors."""
import logging

import pytest
import wandb
from omegaconf import OmegaConf

from experiments.logger import WandbLogger


class FakeRun:
    def __init__(self):
        self.logged, self.summary, self.finished = [], {}, False

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def finish(self):
        self.finished = True


def cfg(mode: str):
    return OmegaConf.create({"logger": {"mode": mode, "project": "wasi", "entity": None, "tags": ["t"]},
                             "method": {"name": "wasi"}, "model": {"name": "m"}, "dataset": {"name": "d"}})


@pytest.fixture
def init_calls(monkeypatch):
    """wandb.init that fails online (as without login or network) and returns a FakeRun otherwise."""
    calls = []

    def fake_init(mode, **settings):
        calls.append((mode, settings))
        if mode == "online":
            raise wandb.errors.CommError("network unreachable")
        if mode == "offline" and settings.get("project") == "broken":
            raise OSError("disk full")
        return FakeRun()

    monkeypatch.setattr(wandb, "init", fake_init)
    return calls


def test_online_init_failure_falls_back_to_offline(init_calls, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="experiments.logger"):
        logger = WandbLogger(cfg("online"), tmp_path, {"seed": 1})
    assert [mode for mode, _ in init_calls] == ["online", "offline"]
    assert init_calls[0][1] == init_calls[1][1]  # same project, name, config, folder
    assert init_calls[1][1]["config"] == {"seed": 1} and init_calls[1][1]["dir"] == str(tmp_path)
    assert "network unreachable" in caplog.text and "wandb sync" in caplog.text
    logger.log({"train/loss": 1.5}, step=3)
    logger.finish({"test/acc": 0.5, "config/seed": 1})
    assert logger.run.logged == [(3, {"train/loss": 1.5})]
    assert logger.run.summary == {"test/acc": 0.5} and logger.run.finished


def test_offline_init_failure_is_raised(init_calls, tmp_path):
    broken = cfg("offline")
    broken.logger.project = "broken"
    with pytest.raises(OSError, match="disk full"):
        WandbLogger(broken, tmp_path, {})
    assert [mode for mode, _ in init_calls] == ["offline"]


def test_disabled_logger_never_calls_wandb(init_calls, tmp_path):
    logger = WandbLogger(cfg("disabled"), tmp_path, {})
    logger.log({"a": 1}, step=1)
    logger.finish({"a": 1})
    assert logger.run is None and init_calls == []
