"""W&B faults: an online init that fails (no login, no network) falls back to an offline run; an
offline or disabled logger never hides its own errors; a resumed training continues its W&B run."""
import json
import logging

import pytest
import wandb
from omegaconf import OmegaConf

from experiments.training.logger import WandbLogger


class FakeRun:
    def __init__(self, id=None):
        self.logged, self.summary, self.finished = [], {}, False
        self.id = id or "fresh1"

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def finish(self):
        self.finished = True


def cfg(mode: str):
    return OmegaConf.create({"logger": {"mode": mode, "init_timeout": 5, "project": "wasi", "entity": None,
                                        "tags": ["t"]},
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
        return FakeRun(settings.get("id"))

    monkeypatch.setattr(wandb, "init", fake_init)
    return calls


def test_online_init_failure_falls_back_to_offline(init_calls, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="experiments.training.logger"):
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


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_a_resumed_training_continues_its_wandb_run(init_calls, tmp_path, mode):
    logger = WandbLogger(cfg(mode), tmp_path, {}, run_id="abc123")
    assert all(s["id"] == "abc123" and s["resume"] == "allow" for _, s in init_calls)  # online falls back, same id
    assert logger.run_id == "abc123"
    fresh = WandbLogger(cfg(mode), tmp_path, {})
    assert init_calls[-1][1]["id"] is None and init_calls[-1][1]["resume"] is None and fresh.run_id == "fresh1"


def test_a_disabled_logger_keeps_the_run_id_for_a_later_resume(init_calls, tmp_path):
    assert WandbLogger(cfg("disabled"), tmp_path, {}, run_id="abc123").run_id == "abc123" and init_calls == []


def test_metrics_jsonl_reads_as_one_uninterrupted_run(init_calls, tmp_path):
    """Every log call is a line; a resumed run (from its checkpoint's step) keeps the lines up to that step and
    logs the rest again; a fresh run starts the file anew; other processes of a job write nothing."""
    first = WandbLogger(cfg("disabled"), tmp_path, {})
    for step in (1, 2, 3):
        first.log({"train/loss": 1.0 / step}, step)
    first.log({"val/acc": 0.5}, 3)
    resumed = WandbLogger(cfg("disabled"), tmp_path, {}, step=2)
    resumed.log({"train/loss": 0.25}, 3)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5}, {"step": 3, "train/loss": 0.25}]
    WandbLogger(cfg("offline"), tmp_path, {}, enabled=False).log({"a": 1}, 9)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3 and init_calls == []
    WandbLogger(cfg("disabled"), tmp_path, {})
    assert (tmp_path / "metrics.jsonl").read_text() == ""
