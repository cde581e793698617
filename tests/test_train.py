"""End to end through train.py (Hydra CLI): one short run, a multirun, and clear errors: a wrong
setting or a failed run ends with one line on stderr, its traceback in train.log, and no checkpoint,
results or W&B run left behind."""
import json
import re

import pytest

from experiments import report
from tests.cli import sweep_results, train
from tests.conftest import METHODS, QUICK
from tests.wandb_log import summary

METRICS = [
    "val/acc", "test/acc", "train/loss", "flops/inference_per_image", "flops/train_step",
    "memory/activation_bytes", "memory/weight_bytes", "memory/peak_bytes", "time/train_step_s",
    "time/inference_per_image_s", "params/total", "params/trainable", "versions/torch", "config/seed",
]


def test_every_method_in_one_multirun_writes_every_metric(method_sweep):
    results = sweep_results(method_sweep)
    assert [r["method"] for r in results] == METHODS
    for r in results:
        assert not [k for k in METRICS if k not in r], r["method"]
        assert 0 < r["params/trainable"] <= r["params/total"] and r["train/steps"] == 6
        assert 0 <= r["test/acc"] <= 1 and r["flops/train_step"] > 3 * r["flops/inference_per_image"]
    converted = [r for r in results if r["method"] in ("wsi", "asi", "wasi")]
    assert all(r["memory/compressed_layers_bytes"] < r["memory/compressed_layers_vanilla_bytes"] for r in converted)
    assert all(len(r["method/layers"]) == 4 and all(layer["weight_rank"] or layer["act_ranks"]
                                                    for layer in r["method/layers"]) for r in converted)


def test_the_offline_wandb_run_holds_the_results(method_sweep):
    run_dir = method_sweep / str(METHODS.index("wasi"))
    results = json.loads((run_dir / "results.json").read_text())
    logged = summary(run_dir)  # read from the run file without the wandb client
    for key in METRICS[:-1] + ["memory/compressed_layers_bytes"]:
        assert logged[key] == pytest.approx(results[key]), key
    assert (run_dir / "best.safetensors").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()


def test_missing_dataset_offline_names_the_fix(tmp_path):
    proc = train(*QUICK, "dataset=cifar10", f"paths.data_dir={tmp_path}", "logger.mode=disabled",
                 f"hydra.run.dir={tmp_path}/run", check=False)
    assert proc.returncode != 0
    assert "DatasetNotFoundError" in proc.stderr and "dataset.source.download=true" in proc.stderr


SMALL = ["model.kwargs.depth=2", "dataset.source.train_size=160", "dataset.source.test_size=64", "trainer.epochs=1",
         "trainer.batch_size=16", "trainer.max_steps=2", "trainer.eval_batches=1", "trainer.measure=false",
         "logger.mode=offline"]


def error_line(proc) -> str:
    """The one line a failed train.py leaves on stderr (progress bars aside)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("overrides, status, line, started", [  # one per way a setting is refused
    (["trainer.grad_clip=-1"], 2,  # a range, checked when the run starts (every range: test_config.py)
     "trainer.grad_clip=-1.0: must be a number > 0. Fix: trainer.grad_clip=2.0, or null to disable clipping", True),
    (["method=wasi", "method.epsilon=abc"], 2, "method.epsilon=abc: must be a float. Fix: e.g. method.epsilon=0.8",
     False),  # a type, checked by Hydra while composing
    (["trainer.epoch=3"], 2, "trainer.epoch is not a setting. Fix: did you mean trainer.epochs?", False),
    (["method=nope"], 2, "method=nope: there is no conf/method/nope.yaml. Fix: method=<one of asi, galore, lora,",
     False),
    (["method=wasi", "method.ranks=[8,8,8]", "method.budget_mib=1"], 2,
     "method.ranks=[8,8,8]: method.budget_mib=1.0 also chooses the activation ranks. Fix: keep one of", True),
    (["method=wsi", "optimizer=adamw"], 2, "optimizer._target_=torch.optim.AdamW: method=wsi updates its weight "
     "factors with the subspace SGD step (docs/method.md, Factored update). Fix: optimizer=sgd", True),
    (["resume=true"], 2, "resume=true but there is no checkpoint at", True),  # found at run time
])
def test_a_wrong_setting_ends_with_one_line_and_leaves_no_run_behind(tmp_path, overrides, status, line, started):
    run_dir = tmp_path / "run"
    proc = train(*SMALL, *overrides, f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == status
    assert error_line(proc).startswith(f"error: {line}")
    if started:  # Hydra made the folder and its logs; the run wrote nothing else, and train.log has the traceback
        assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "train.log"]
        log = (run_dir / "train.log").read_text()
        assert f"[ERROR] - {line}" in log and "Traceback (most recent call last)" in log
    else:  # refused while composing: no folder at all
        assert not run_dir.exists()


def test_hydra_full_error_shows_the_traceback(tmp_path):
    proc = train(*SMALL, "trainer.grad_clip=-1", f"hydra.run.dir={tmp_path}", check=False,
                 env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr and "ConfigError: trainer.grad_clip=-1.0" in proc.stderr


def test_ranks_alone_choose_the_activation_ranks(tmp_path):
    train(*SMALL, "method=wasi", "method.ranks=[4,4,4]", "logger.mode=disabled", f"hydra.run.dir={tmp_path}")
    layers = json.loads((tmp_path / "results.json").read_text())["method/layers"]
    assert [layer["act_ranks"] for layer in layers] == [[4, 4, 4]] * 4


def test_an_infeasible_budget_names_a_feasible_one_that_then_runs(tmp_path):
    common = [*SMALL, "method=wasi", "logger.mode=disabled", f"paths.cache_dir={tmp_path}/cache"]
    proc = train(*common, "method.budget_mib=0.0001", f"hydra.run.dir={tmp_path}/tiny", check=False)
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith("error: method.budget_mib=0.0001: below the smallest activation memory")
    feasible = re.search(r"Fix: method.budget_mib=([0-9.]+) or more", line)[1]
    train(*common, f"method.budget_mib={feasible}", f"hydra.run.dir={tmp_path}/enough")
    assert json.loads((tmp_path / "enough" / "results.json").read_text())["config/method.budget_mib"] == float(feasible)


def test_a_damaged_weights_file_is_refused_without_suggesting_unsafe_loading(tmp_path):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(bytes(range(256)) * 16)
    run_dir = tmp_path / "run"
    proc = train(*SMALL, f"model.checkpoint={weights}", f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 1
    line = error_line(proc)
    assert line.startswith(f"error: UnreadableWeightsError: model.checkpoint={weights} is not a readable weights file")
    assert line.endswith(f"(traceback: {run_dir / 'train.log'})")
    log = (run_dir / "train.log").read_text()
    assert "weights_only" not in line.replace("weights_only=True", "") and "False" not in log
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "train.log"]  # no W&B run, no checkpoint


def test_a_failed_sweep_job_is_logged_and_listed_in_the_report(tmp_path):
    proc = train("-m", *SMALL, "logger.mode=disabled", "trainer.grad_clip=2,-1", f"hydra.sweep.dir={tmp_path}",
                 check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: trainer.grad_clip=-1.0: must be a number > 0. "
                                                    "Fix: trainer.grad_clip=2.0, or null to disable clipping")
    assert (tmp_path / "0" / "results.json").is_file() and not (tmp_path / "1" / "results.json").exists()
    assert "Traceback (most recent call last)" in (tmp_path / "1" / "train.log").read_text()
    assert report.find_failed(tmp_path) == [{"run": "1", "error": "trainer.grad_clip=-1.0: must be a number > 0. "
                                             "Fix: trainer.grad_clip=2.0, or null to disable clipping"}]
