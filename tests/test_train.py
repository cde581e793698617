"""End to end through train.py (Hydra CLI): a multirun of every method, and how a run ends when something is
wrong: one line on stderr, the exit status, the traceback in train.log, and no checkpoint, results or W&B run
left behind. A subprocess only where the command line, its exit status or the files it leaves are the point;
the messages of every other refusal are checked in process (test_config.py, and below)."""
import json
import re

import pytest
import torch

from experiments import report
from experiments.builders.variant import build_variant
from experiments.configuration.schema import ConfigError
from experiments.data.datasets import DatasetNotFoundError
from experiments.run import run
from experiments.training import errors
from tests.helpers import METHODS, QUICK, sweep_results, train
from tests.tiny_models import batches
from tests.wandb_log import summary

METRICS = [
    "val/acc", "test/acc", "train/loss", "flops/inference_per_image", "flops/train_step",
    "memory/activation_bytes", "memory/weight_bytes", "memory/peak_bytes", "time/train_step_s",
    "time/inference_per_image_s", "params/total", "params/trainable", "versions/torch", "config/seed",
]
EVALUATED = 2 * 16  # QUICK: 2 evaluation batches of 16 images


def test_every_method_in_one_multirun_writes_every_metric(method_sweep):
    results = sweep_results(method_sweep)
    assert [r["method"] for r in results] == METHODS
    for r in results:
        assert not [k for k in METRICS if k not in r], r["method"]
        assert 0 < r["params/trainable"] <= r["params/total"] and r["train/steps"] == 6
        assert r["test/acc"] * EVALUATED == round(r["test/acc"] * EVALUATED)  # a count of the 32 images tested
        assert r["flops/train_step"] > 3 * r["flops/inference_per_image"]
    converted = [r for r in results if r["method"] in ("wsi", "asi", "wasi")]
    assert all(r["memory/compressed_layers_bytes"] < r["memory/compressed_layers_vanilla_bytes"] for r in converted)
    assert all(len(r["method/layers"]) == 4 and all(layer["weight_rank"] or layer["act_ranks"]
                                                    for layer in r["method/layers"]) for r in converted)


def test_the_offline_wandb_run_and_metrics_jsonl_hold_the_results(method_sweep):
    run_dir = method_sweep / str(METHODS.index("wasi"))
    results = json.loads((run_dir / "results.json").read_text())
    logged = summary(run_dir)  # read from the run file without the wandb client
    for key in METRICS[:-1] + ["memory/compressed_layers_bytes"]:
        assert logged[key] == pytest.approx(results[key]), key
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "train/loss" in h] == list(range(1, 7))
    assert [h for h in history if "train/loss" in h][-1]["train/loss"] == results["train/loss"]
    assert max(h["val/acc"] for h in history if "val/acc" in h) == results["val/acc"]
    assert (run_dir / "best.safetensors").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()


SMALL = ["model.kwargs.depth=2", "dataset.source.train_size=160", "dataset.source.test_size=64", "trainer.epochs=1",
         "trainer.batch_size=16", "trainer.max_steps=2", "trainer.eval_batches=1", "trainer.measure=false",
         "logger.mode=offline"]


def error_line(proc) -> str:
    """The one line a failed train.py leaves on stderr (progress bars aside)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_a_setting_refused_when_the_run_starts_ends_with_one_line_and_status_2(tmp_path):
    """Hydra made the folder and its logs; the run wrote nothing else, and train.log has the traceback."""
    run_dir = tmp_path / "run"
    proc = train(*SMALL, "optimizer.lr=-1", f"hydra.run.dir={run_dir}", check=False)
    line = "optimizer.lr=-1.0: must be a number > 0. Fix: optimizer.lr=0.05"
    assert proc.returncode == errors.SETTING and error_line(proc) == f"error: {line}"
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "train.log"]
    log = (run_dir / "train.log").read_text()
    assert f"[ERROR] - {line}" in log and "Traceback (most recent call last)" in log


def test_a_setting_refused_while_composing_leaves_no_folder(tmp_path):
    proc = train(*SMALL, "method=wasi", "method.epsilon=abc", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == errors.SETTING
    assert error_line(proc) == "error: method.epsilon=abc: must be a float. Fix: e.g. method.epsilon=0.8"
    assert not (tmp_path / "run").exists()


def test_a_failed_run_ends_with_status_1_and_points_at_its_traceback(tmp_path):
    """A damaged weights file, refused without suggesting unsafe loading; no W&B run, no checkpoint."""
    weights = tmp_path / "weights.pth"
    weights.write_bytes(bytes(range(256)) * 16)
    run_dir = tmp_path / "run"
    proc = train(*SMALL, f"model.checkpoint={weights}", f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == errors.FAILURE
    line = error_line(proc)
    assert line.startswith(f"error: UnreadableWeightsError: model.checkpoint={weights} is not a readable weights file")
    assert line.endswith(f"(traceback: {run_dir / 'train.log'})")
    log = (run_dir / "train.log").read_text()
    assert "weights_only" not in line.replace("weights_only=True", "") and "False" not in log
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "train.log"]


def test_a_failed_sweep_job_is_logged_and_listed_in_the_report(tmp_path):
    proc = train("-m", *SMALL, "logger.mode=disabled", "trainer.eval_interval=0", f"hydra.sweep.dir={tmp_path}",
                 check=False)
    line = "trainer.eval_interval=0: must be an int >= 1. Fix: trainer.eval_interval=1 (every epoch)"
    assert proc.returncode == errors.SETTING and proc.stderr.strip().splitlines()[-1] == f"error: {line}"
    assert not (tmp_path / "0" / "results.json").exists()
    assert "Traceback (most recent call last)" in (tmp_path / "0" / "train.log").read_text()
    assert report.find_failed(tmp_path) == [{"run": "0", "error": line}]


def test_hydra_full_error_shows_the_traceback(monkeypatch):
    """errors.main re-raises the run's own exception (Python prints its traceback) instead of the one line."""
    cause = ConfigError("trainer.epochs=0: must be an int >= 1. Fix: trainer.epochs=50")

    def entry():
        raise errors.RunFailed(cause, str(cause), errors.SETTING)

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError) as info:
        errors.main(entry)
    assert info.value is cause
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    with pytest.raises(SystemExit) as stopped:
        errors.main(entry)
    assert stopped.value.code == errors.SETTING


def test_missing_dataset_offline_names_the_fix(make_cfg, tmp_path):
    cfg = make_cfg(*QUICK, "dataset=cifar10", f"paths.data_dir={tmp_path}", "logger.mode=disabled")
    with pytest.raises(DatasetNotFoundError, match="dataset.source.download=true") as info:
        run(cfg)
    assert errors.status(info.value) == errors.FAILURE


def test_resume_without_a_checkpoint_is_refused_before_anything_is_built(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr("experiments.run.build_loaders", lambda *a: pytest.fail("built the loaders"))
    with pytest.raises(Exception, match="resume=true but there is no checkpoint at") as info:
        run(make_cfg(*QUICK, "resume=true", "logger.mode=disabled"))
    assert errors.one_line(info.value).startswith("resume=true but there is no checkpoint at")
    assert errors.status(info.value) == errors.SETTING
    assert not (tmp_path / "run").exists()


def test_an_infeasible_budget_names_a_feasible_one_that_then_builds(make_cfg):
    data = batches(32, n=1, batch=16)
    with pytest.raises(ConfigError) as info:
        build_variant(make_cfg(*QUICK, "method=wasi", "method.budget_mib=0.0001"), 10, data, torch.device("cpu"))
    line = errors.one_line(info.value)
    assert line.startswith("method.budget_mib=0.0001: below the smallest activation memory")
    assert errors.status(info.value) == errors.SETTING
    feasible = re.search(r"Fix: method.budget_mib=([0-9.]+) or more", line)[1]
    variant = build_variant(make_cfg(*QUICK, "method=wasi", f"method.budget_mib={feasible}"), 10, data,
                            torch.device("cpu"))
    assert variant.method.config.budget_bytes >= info.value.__cause__.min_feasible_bytes
