"""experiments/pretrain.py and the shipped checkpoint: the recipe runs and is deterministic, its file
loads into vit_tiny_cpu with a fresh head, and model=vit_tiny_pretrained finds it from any directory."""
import hashlib
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from experiments import pretrain
from experiments.builders.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "vit_tiny_fractal.safetensors"
TINY = ["--num-classes", "6", "--train-size", "192", "--val-size", "60", "--walkers", "16", "--steps", "32",
        "--epochs", "2", "--batch-size", "32", "--threads", "1"]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def compose_model(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_lr_schedule_warms_up_then_decays():
    f = [pretrain.lr_factor(s, total=100, warmup=10, min_ratio=0.01) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(0.01, abs=1e-3)


def test_recipe_runs_deterministically_and_writes_a_loadable_backbone(tmp_path, one_thread):
    a = pretrain.main([*TINY, "--out", str(tmp_path / "a.safetensors"), "--run-dir", str(tmp_path / "ra")])
    b = pretrain.main([*TINY, "--out", str(tmp_path / "b.safetensors"), "--run-dir", str(tmp_path / "rb")])
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not any(k.startswith("head") for k in wa)  # the head is left out ...
    full = load_file(str(tmp_path / "ra" / "model.safetensors"))
    assert full["head.weight"].shape == (6, 96)  # ... but kept in the run folder
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "vit_tiny_cpu.yaml")
    cfg.checkpoint = str(a)
    model = build_model(cfg, num_classes=6)  # even with as many classes as pretraining, the head is fresh
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in wa.items())
    assert not torch.equal(own["head.weight"], full["head.weight"])
    card = a.with_suffix(".md").read_text()
    assert hashlib.sha256(a.read_bytes()).hexdigest() in card
    assert "python -m experiments.pretrain --num-classes 6" in card


def test_recipe_defaults_match_the_dataset_config():
    """`dataset=fractals` draws the pretraining classes and images (its test split is the held-out split)."""
    cfg = OmegaConf.load(ROOT / "conf" / "dataset" / "fractals.yaml")
    r, source = pretrain.Recipe(), cfg.source
    assert source.classes == cfg.num_classes == r.num_classes
    for key in ("train_size", "fill_rate", "jitter", "min_scale", "trim", "supersample", "walkers",
                "steps"):
        assert source[key] == getattr(r, key), key
    assert (source.seed, source.test_size, source.resolution) == (r.data_seed, r.val_size, 32)


def test_pretrained_config_is_the_tiny_architecture():
    tiny = OmegaConf.load(ROOT / "conf" / "model" / "vit_tiny_cpu.yaml")
    pre = OmegaConf.load(ROOT / "conf" / "model" / "vit_tiny_pretrained.yaml")
    assert (pre.timm_name, pre.image_size, pre.kwargs, pre.pretrained) == (tiny.timm_name, tiny.image_size, tiny.kwargs,
                                                                           False)


def test_shipped_checkpoint_loads_from_another_directory(tmp_path, monkeypatch):
    assert SHIPPED.is_file(), "checkpoints/vit_tiny_fractal.safetensors is missing (git lfs? .gitignore?)"
    monkeypatch.chdir(tmp_path)  # the relative path in the config must still find the file
    cfg = compose_model("model=vit_tiny_pretrained", "dataset=digits")
    assert not Path(cfg.model.checkpoint).is_absolute()
    model = build_model(cfg.model, num_classes=cfg.dataset.num_classes)
    shipped = load_file(str(SHIPPED))
    own = model.state_dict()
    assert set(own) - set(shipped) == {"head.weight", "head.bias"} and set(shipped) <= set(own)
    for name in ("patch_embed.proj.weight", "blocks.3.mlp.fc2.weight", "norm.bias", "pos_embed"):
        assert torch.equal(own[name], shipped[name]), name
    assert model.get_classifier().out_features == 10
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_shipped_card_matches_the_file():
    card = SHIPPED.with_suffix(".md").read_text()
    digest = hashlib.sha256(SHIPPED.read_bytes()).hexdigest()
    assert digest in card
    assert re.search(r"python -m experiments\.pretrain", card)
    assert 1e6 < SHIPPED.stat().st_size < 1e7  # a few MB
