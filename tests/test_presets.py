"""Paper sweep presets: each composes at paper scale and its small offline variant runs."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from experiments.builders.variant import build_variant
from experiments.configuration.schema import validate
from tests.cli import ROOT, sweep_results, train

PRESETS = ["vit_b32_eps", "swin_t_eps", "vit_b32_baselines", "swin_t_baselines", "last_n", "budget"]


def composed(experiment: str, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"+experiment={experiment}", *overrides], return_hydra_config=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_at_paper_scale_and_small(preset):
    cfg = composed(preset)
    assert cfg.model.name in ("vit_b32", "swin_t") and cfg.hardware.name == "cuda"
    assert cfg.trainer.epochs == 50 and cfg.trainer.batch_size == 128
    assert cfg.hydra.sweeper.params
    small = composed(f"[{preset},small]")
    assert small.model.name == "vit_tiny_cpu" and small.dataset.name == "shapes" and small.hardware.name == "cpu"
    assert small.hydra.sweeper.params == cfg.hydra.sweeper.params  # the same sweep, smaller jobs


def run_small(preset: str, tmp_path: Path, *overrides: str) -> list[dict]:
    train("-m", f"+experiment=[{preset},small]", f"hydra.sweep.dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache",
          *overrides)
    return sweep_results(tmp_path)


def test_paper_eps_preset_builds_each_method_as_the_authors_ran_it():
    """Composed and built in process, as a job of the small variant: the rest of the model trains densely, and
    activation ranks come from epsilon 0.4 whatever the weight epsilon."""
    methods = str(composed("vit_b32_eps").hydra.sweeper.params.method).split(",")
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    for choice, act_eps in zip(methods, [None, 0.4, 0.4]):
        cfg = composed("[vit_b32_eps,small]", f"method={choice}", "method.epsilon=0.5")
        variant = build_variant(cfg, 10, [(x, y)], torch.device("cpu"))
        assert {layer["act_epsilon"] for layer in variant.summary["layers"]} == {act_eps}, choice
        assert all(layer["weight_rank"] for layer in variant.summary["layers"] if choice != "paper/asi")
        assert all(p.requires_grad for p in variant.model.parameters()), choice


@pytest.mark.slow
def test_small_baselines_sweep_runs(tmp_path):
    results = run_small("vit_b32_baselines", tmp_path)
    assert [r["method"] for r in results] == ["vanilla", "lora", "svd_llm", "wasi"]


@pytest.mark.slow
def test_small_budget_sweep_runs_and_reuses_one_rank_table(tmp_path):
    results = run_small("budget", tmp_path)
    assert [r["config/method.budget_mib"] for r in results] == [16, 32, 64, 128, 256]
    assert len(list((tmp_path / "cache" / "rank_tables").glob("*.json"))) == 1


@pytest.mark.slow
def test_small_eps_sweep_runs_every_method_at_one_epsilon_as_the_authors_ran_it(tmp_path):
    results = run_small("vit_b32_eps", tmp_path, "method.epsilon=0.5")
    assert [(r["method"], r["config/method.epsilon"]) for r in results] == [("wsi", 0.5), ("asi", 0.5), ("wasi", 0.5)]
    assert [{layer["act_epsilon"] for layer in r["method/layers"]} for r in results] == [{None}, {0.4}, {0.4}]
    assert all(r["params/trainable"] == r["params/total"] for r in results)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_train_as_the_authors_scripts(preset):
    """Every subspace or adapter method of a paper preset trains the rest of the model densely."""
    cfg = composed(preset)
    methods = str(cfg.hydra.sweeper.params.get("method", cfg.hydra.runtime.choices.method)).split(",")
    assert all(m == "vanilla" or m.startswith("paper/") for m in methods), methods


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["vit_b32_eps", "swin_t_eps", "swin_t_baselines", "last_n"])
def test_small_sweep_runs(tmp_path, preset):
    results = run_small(preset, tmp_path)
    assert results and all(0 <= r["test/acc"] <= 1 for r in results)


@pytest.mark.parametrize("extra", [[], ["method=wasi", "method.epsilon=0.4"], ["model=vit_tiny_cpu"]])
def test_offline_presets_compose_and_validate(extra):
    """make run's preset (vanilla and WASI from the shipped checkpoint on digits) and the fine-tuning benchmark."""
    demo = composed("demo", *extra)
    model = "vit_tiny_cpu" if "model=vit_tiny_cpu" in extra else "vit_tiny_pretrained"
    assert (demo.model.name, demo.dataset.name) == (model, "digits")
    assert demo.hydra.sweeper.params.method == "vanilla,wasi" and demo.hardware.name == "cpu"
    bench = composed("finetune", "dataset=shapes", *extra)
    assert bench.method.train_rest and bench.hydra.sweeper.params.seed == "1,2,3"
    for cfg in (demo, bench):
        with open_dict(cfg):
            cfg.pop("hydra")  # the job's own node, resolved by Hydra when it runs
            cfg.paths.run_dir = "unused"
        validate(cfg)
