"""Sweeps beyond one process: SLURM (submitit) and local parallel (joblib) launchers, Optuna preset."""
from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from tests.helpers import compose, sweep_results, train

TINY = ["dataset=digits", "model=vit_tiny_cpu", "model.kwargs.depth=2", "trainer.epochs=1", "trainer.max_steps=2",
        "trainer.batch_size=32", "trainer.eval_batches=1", "trainer.measure=false", "logger.mode=disabled",
        "hardware.threads=1"]


def compose_hydra(*overrides: str):
    return compose(*overrides, hydra=True)


def test_slurm_launcher_composes():
    launcher = compose_hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu").hydra.launcher
    cls = hydra.utils.get_class(launcher._target_)
    assert cls.__name__ == "SlurmLauncher" and cls.__module__.startswith("hydra_plugins.hydra_submitit_launcher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.array_parallelism) == ("gpu", 1, 16)
    assert launcher.submitit_folder.endswith("/.submitit/%j")  # per job, inside the sweep folder


def test_joblib_launcher_composes():
    launcher = compose_hydra("hydra/launcher=joblib_local", "hydra.launcher.n_jobs=3").hydra.launcher
    assert hydra.utils.get_class(launcher._target_).__name__ == "JoblibLauncher"
    assert launcher.n_jobs == 3 and launcher.prefer == "processes"


def test_optuna_preset_composes_to_a_valid_search_space():
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
    from optuna.distributions import LogUniformDistribution, UniformDistribution

    cfg = compose_hydra("search=optuna")
    sweeper = cfg.hydra.sweeper
    assert hydra.utils.get_class(sweeper._target_).__name__ == "OptunaSweeper"
    assert sweeper.direction == "maximize"  # train.py returns val/acc
    assert cfg.method.name == "wasi" and cfg.optimizer._target_ == "torch.optim.SGD"
    assert type(hydra.utils.instantiate(sweeper.sampler)).__name__ == "TPESampler"
    params = OmegaConf.to_container(sweeper.params)
    assert set(params) == {"method.epsilon", "method.epsilon_act", "optimizer.lr"}
    for key in params:  # every searched key exists in the composed config (method.epsilon_act: null = epsilon)
        parent, _, name = key.rpartition(".")
        assert name in OmegaConf.select(cfg, parent)
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    dists = {o.key_or_group: create_optuna_distribution_from_override(o) for o in parsed}
    assert isinstance(dists["optimizer.lr"], LogUniformDistribution)
    for key in ("method.epsilon", "method.epsilon_act"):
        assert isinstance(dists[key], UniformDistribution) and 0 < dists[key].low < dists[key].high <= 1


def sweep(tmp_path: Path, *overrides: str) -> list[dict]:
    train("-m", *overrides, *TINY, f"hydra.sweep.dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}")
    return sweep_results(tmp_path)


@pytest.mark.slow
def test_joblib_launcher_runs_two_jobs(tmp_path: Path):
    results = sweep(tmp_path, "hydra/launcher=joblib_local", "method=vanilla,wasi")
    assert len(results) == 2
    assert sorted(r["method"] for r in results) == ["vanilla", "wasi"]
    assert all(r["train/steps"] == 2 for r in results)


@pytest.mark.slow
def test_optuna_sweep_maximises_returned_accuracy(tmp_path: Path):
    trials = sweep(tmp_path, "search=optuna", "hydra.sweeper.n_trials=3")
    assert len(trials) == 3
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(t["val/acc"] for t in trials)
    assert len({(t["config/method.epsilon"], t["config/optimizer.lr"]) for t in trials}) == 3  # distinct samples
