"""Presets: each paper sweep composes at paper scale with either model and as its small offline variant
(`debug=small`), which runs; the offline presets (make run's, the fine-tuning benchmark) validate."""
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from experiments.builders.variant import build_variant
from experiments.configuration.schema import validate
from tests.helpers import CONF, compose, sweep_results, train
from wasi import EPS_SET

PRESETS = ["eps", "baselines", "last_n", "budget"]  # the paper's sweeps
TEXT_PRESETS = ["tinyllama_boolq", "tinyllama_boolq_sweep"]  # its language-model run


def composed(*overrides: str):
    return compose(*overrides, hydra=True)


def test_every_paper_sweep_is_a_preset():
    assert set(PRESETS) <= {p.stem for p in (CONF / "experiment").glob("*.yaml")}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_at_paper_scale_for_either_model_and_small(preset):
    cfg = composed(f"experiment={preset}")
    assert cfg.model.name == "vit_b32" and cfg.hardware.name == "cuda"
    assert cfg.trainer.epochs == 50 and cfg.trainer.batch_size == 128
    assert cfg.hydra.sweeper.params
    assert composed(f"experiment={preset}", "model=swin_t").model.name == "swin_t"  # the model is a choice
    small = composed(f"experiment={preset}", "debug=small")
    assert small.model.name == "vit_tiny_cpu" and small.dataset.name == "shapes" and small.hardware.name == "cpu"
    assert small.hydra.sweeper.params == cfg.hydra.sweeper.params  # the same sweep, smaller jobs


def test_the_eps_sweep_is_the_papers_epsilon_set():
    sweep = composed("experiment=eps").hydra.sweeper.params["method.epsilon"]
    assert tuple(float(e) for e in str(sweep).split(",")) == EPS_SET


def test_paper_eps_preset_builds_each_method_as_the_authors_ran_it():
    """Composed and built in process, as a job of the small variant: the rest of the model trains densely, and
    activation ranks come from epsilon 0.4 whatever the weight epsilon."""
    methods = str(composed("experiment=eps").hydra.sweeper.params.method).split(",")
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    for choice, act_eps in zip(methods, [None, 0.4, 0.4]):
        cfg = composed("experiment=eps", "debug=small", f"method={choice}", "method.epsilon=0.5")
        variant = build_variant(cfg, 10, [(x, y)], torch.device("cpu"))
        assert {layer["act_epsilon"] for layer in variant.summary["layers"]} == {act_eps}, choice
        assert all(layer["weight_rank"] for layer in variant.summary["layers"] if choice != "paper/asi")
        assert all(p.requires_grad for p in variant.model.parameters()), choice


@pytest.mark.parametrize("preset", [*PRESETS, *TEXT_PRESETS])
def test_presets_train_as_the_authors_scripts(preset):
    """Every subspace or adapter method of a paper preset trains the rest of the model densely."""
    cfg = composed(f"experiment={preset}")
    methods = str(cfg.hydra.sweeper.params.get("method", cfg.hydra.runtime.choices.method)).split(",")
    assert all(m == "vanilla" or m.startswith("paper/") for m in methods), methods


@pytest.mark.parametrize("extra", [[], ["method=wasi", "method.epsilon=0.4"], ["model=vit_tiny_cpu"]])
def test_offline_presets_compose_and_validate(extra):
    """make run's preset (vanilla and WASI from the shipped checkpoint on digits) and the fine-tuning benchmark."""
    demo = composed("experiment=demo", *extra)
    model = "vit_tiny_cpu" if "model=vit_tiny_cpu" in extra else "vit_tiny_pretrained"
    assert (demo.model.name, demo.dataset.name) == (model, "digits")
    assert demo.hydra.sweeper.params.method == "vanilla,paper/wasi,wasi" and demo.hardware.name == "cpu"
    bench = composed("experiment=finetune", "dataset=shapes", *extra)
    assert bench.method.train_rest and bench.hydra.sweeper.params.seed == "1,2,3"
    for cfg in (demo, bench):
        with open_dict(cfg):
            cfg.pop("hydra")  # the job's own node, resolved by Hydra when it runs
            cfg.paths.run_dir = "unused"
        validate(cfg)


def run_small(preset: str, tmp_path: Path, *overrides: str) -> list[dict]:
    train("-m", f"experiment={preset}", "debug=small", f"hydra.sweep.dir={tmp_path}",
          f"paths.cache_dir={tmp_path}/cache", *overrides)
    return sweep_results(tmp_path)


@pytest.mark.slow
def test_small_baselines_sweep_runs(tmp_path):
    results = run_small("baselines", tmp_path)
    assert [r["method"] for r in results] == ["vanilla", "lora", "svd_llm", "wasi"]


@pytest.mark.slow
def test_small_budget_sweep_runs_and_reuses_one_rank_table(tmp_path):
    results = run_small("budget", tmp_path)
    assert [r["config/method.budget_mib"] for r in results] == [16, 32, 64, 128, 256]
    assert len(list((tmp_path / "cache" / "rank_tables").glob("*.json"))) == 1


@pytest.mark.slow
def test_small_eps_sweep_runs_every_method_at_one_epsilon_as_the_authors_ran_it(tmp_path):
    results = run_small("eps", tmp_path, "method.epsilon=0.5")
    assert [(r["method"], r["config/method.epsilon"]) for r in results] == [("wsi", 0.5), ("asi", 0.5), ("wasi", 0.5)]
    assert [{layer["act_epsilon"] for layer in r["method/layers"]} for r in results] == [{None}, {0.4}, {0.4}]
    assert all(r["params/trainable"] == r["params/total"] for r in results)


@pytest.mark.slow
def test_small_last_n_sweep_runs(tmp_path):
    results = run_small("last_n", tmp_path)
    assert [(r["method"], r["config/method.last_n"]) for r in results] == [
        (m, n) for m in ("vanilla", "wasi") for n in (1, 2, 4, 8, 12)]
    assert all(r["train/steps"] == 2 for r in results)


def jobs(cfg) -> list[list[str]]:
    """The overrides of every job of a preset's sweep (its params' product)."""
    import itertools

    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    return [[f"{k}={v}" for k, v in zip(params, values)] for values in itertools.product(*params.values())]


@pytest.mark.slow  # make test-slow
def test_the_tinyllama_presets_are_the_authors_boolq_runs():
    cfg = composed("experiment=tinyllama_boolq")
    assert (cfg.model.name, cfg.dataset.name, cfg.hardware.name) == ("tinyllama", "boolq", "cuda")
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.model.max_length, cfg.trainer.grad_clip, cfg.seed) == (
        50, 8, 128, 2.0, 233)
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.method.last_n) == (0.05, 0.0, 5)
    assert cfg.hydra.sweeper.params.method == "vanilla,paper/wasi_tinyllama"
    sweep = composed("experiment=tinyllama_boolq_sweep")
    assert sweep.hydra.sweeper.params["method.last_n"] == "1,2,3,4,5"
    eps = tuple(float(e) for e in str(sweep.hydra.sweeper.params["method.epsilon"]).split(","))
    assert eps == (0.1, *EPS_SET) and (sweep.trainer.batch_size, sweep.model.max_length) == (8, 128)
    for preset in TEXT_PRESETS:
        paper = composed(f"experiment={preset}")
        small = composed(f"experiment={preset}", "debug=small_text")
        assert (small.model.name, small.dataset.name, small.hardware.name) == ("llama_tiny", "yesno", "cpu")
        assert small.hydra.sweeper.params == paper.hydra.sweeper.params  # the same sweep, smaller jobs
        for job in jobs(paper):  # every job of the sweep composes and validates, as the paper's and the small run
            for extra in ([], ["debug=small_text"]):
                cfg = compose(f"experiment={preset}", *extra, *job, run_dir=Path("unused"))
                validate(cfg)
                assert cfg.method.name in ("vanilla", "wasi")
                if cfg.method.name == "wasi":
                    assert cfg.method.train_rest and cfg.method.epsilon_act is None  # activation ε = weight ε


def test_the_offline_text_benchmark_preset_validates():
    cfg = composed("experiment=llama_tiny")
    assert (cfg.model.name, cfg.dataset.name, cfg.trainer.batch_size, cfg.method.epsilon) == ("llama_tiny", "yesno", 8,
                                                                                              0.1)
    params = cfg.hydra.sweeper.params
    assert params.seed == "1,2,3" and params.method == "vanilla,paper/wasi_tinyllama"
    for job in jobs(cfg):
        validate(compose("experiment=llama_tiny", *job, run_dir=Path("unused")))


@pytest.mark.slow
def test_small_tinyllama_sweep_runs(tmp_path):
    train("-m", "experiment=tinyllama_boolq_sweep", "debug=small_text", f"hydra.sweep.dir={tmp_path}",
          f"paths.cache_dir={tmp_path}/cache", "method.last_n=1,2", "method.epsilon=0.1,0.5")
    results = sweep_results(tmp_path)
    assert [(r["config/method.last_n"], r["config/method.epsilon"]) for r in results] == [
        (1, 0.1), (1, 0.5), (2, 0.1), (2, 0.5)]
    assert [len(r["method/layers"]) for r in results] == [3, 3, 6, 6]  # last_n counts decoder layers: 3 linears each
