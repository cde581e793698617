"""End to end through train.py (Hydra CLI): one short run, a multirun, and clear errors."""
import json

import pytest

from tests.cli import sweep_results, train
from tests.wandb_log import summary

QUICK = [
    "model=vit_tiny_cpu", "model.kwargs.depth=2",
    "trainer.epochs=2", "trainer.batch_size=16", "trainer.max_steps=6", "trainer.eval_batches=2",
    "trainer.timing_repeats=1",
]
METRICS = [
    "val/acc", "test/acc", "train/loss", "flops/inference_per_image", "flops/train_step",
    "memory/activation_bytes", "memory/weight_bytes", "memory/peak_bytes", "time/train_step_s",
    "time/inference_per_image_s", "params/total", "params/trainable", "versions/torch", "config/seed",
]


def test_short_run_writes_every_metric_to_results_and_wandb(tmp_path):
    train(*QUICK, "method=wasi", "dataset.source.train_size=160", "dataset.source.test_size=64", "logger.mode=offline", f"hydra.run.dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache")
    results = json.loads((tmp_path / "results.json").read_text())
    missing = [k for k in METRICS + ["memory/compressed_layers_bytes", "memory/compressed_layers_vanilla_bytes"] if k not in results]
    assert not missing
    assert results["method"] == "wasi" and results["train/steps"] == 6
    assert 0 <= results["test/acc"] <= 1 and results["flops/train_step"] > 3 * results["flops/inference_per_image"]
    assert results["memory/compressed_layers_bytes"] < results["memory/compressed_layers_vanilla_bytes"]
    layers = results["method/layers"]
    assert len(layers) == 4 and all(layer["weight_rank"] >= 1 for layer in layers)
    logged = summary(tmp_path)  # the offline W&B run holds the same numbers
    for key in METRICS[:-1] + ["memory/compressed_layers_bytes"]:
        assert logged[key] == pytest.approx(results[key]), key
    assert (tmp_path / "best.safetensors").is_file() and (tmp_path / ".hydra" / "config.yaml").is_file()


def test_multirun_writes_one_results_file_per_job(tmp_path):
    train("-m", *QUICK, "trainer.measure=false", "logger.mode=disabled", "method=vanilla",
          "dataset=shapes,digits", f"hydra.sweep.dir={tmp_path}")
    assert [r["dataset"] for r in sweep_results(tmp_path)] == ["shapes", "digits"]


def test_missing_dataset_offline_names_the_fix(tmp_path):
    proc = train(*QUICK, "dataset=cifar10", f"paths.data_dir={tmp_path}", "logger.mode=disabled",
                 f"hydra.run.dir={tmp_path}/run", check=False)
    assert proc.returncode != 0
    assert "DatasetNotFoundError" in proc.stderr and "dataset.source.download=true" in proc.stderr


def test_factored_update_with_adamw_is_refused(tmp_path):
    proc = train(*QUICK, "method=wsi", "optimizer=adamw", "logger.mode=disabled", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0 and "optimizer=sgd" in proc.stderr


def test_every_method_in_one_multirun_writes_every_metric(tmp_path):
    train("-m", *QUICK, "dataset.source.train_size=160", "dataset.source.test_size=64", "logger.mode=disabled",
          "method=vanilla,lora,svd_llm,wsi,asi,wasi", f"hydra.sweep.dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache")
    results = sweep_results(tmp_path)
    assert [r["method"] for r in results] == ["vanilla", "lora", "svd_llm", "wsi", "asi", "wasi"]
    for r in results:
        assert not [k for k in METRICS if k not in r], r["method"]
        assert 0 < r["params/trainable"] <= r["params/total"]
    converted = [r for r in results if r["method"] in ("wsi", "asi", "wasi")]
    assert all(r["memory/compressed_layers_bytes"] <= r["memory/compressed_layers_vanilla_bytes"] for r in converted)
