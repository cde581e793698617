"""Every config group choice composes and instantiates the right classes."""
from pathlib import Path

import hydra
import pytest
import torch
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "dataset", "method", "hardware", "optimizer", "logger"]


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,choice", [(g, c) for g in GROUPS for c in choices(g)])
def test_every_choice_composes(make_cfg, group, choice):
    cfg = make_cfg(f"{group}={choice}")
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group in ("optimizer", "logger"):
        assert cfg[group] == OmegaConf.load(CONF / group / f"{choice}.yaml")
    else:
        assert cfg[group].name == choice


def test_required_groups_and_paper_defaults(make_cfg):
    cfg = make_cfg()
    assert set(GROUPS) <= set(cfg)
    assert set(choices("method")) >= {"vanilla", "asi", "wsi", "wasi"}
    assert set(choices("model")) >= {"vit_b32", "swin_t", "vit_tiny_cpu"}
    assert set(choices("hardware")) >= {"cuda", "cpu_pi"}
    t = cfg.trainer
    assert (t.epochs, t.batch_size, t.grad_clip, t.min_lr_ratio, cfg.seed) == (50, 128, 2.0, 0.1, 233)
    opt = hydra.utils.instantiate(cfg.optimizer)
    assert opt.func is torch.optim.SGD and opt.keywords == {"lr": 0.05, "momentum": 0.0, "weight_decay": 1e-4}
    assert make_cfg("model=vit_b32").model.timm_name == "vit_base_patch32_224"
    assert make_cfg("model=swin_t").model.timm_name == "swin_tiny_patch4_window7_224"
    assert make_cfg("hardware=cpu_pi").hardware.threads == 4


@pytest.mark.parametrize("method", ["vanilla", "asi", "wsi", "wasi"])
def test_methods_instantiate(make_cfg, method):
    obj = hydra.utils.instantiate(make_cfg(f"method={method}").method)
    assert obj.name == method


def test_quick_run_overrides_exist(make_cfg):
    cfg = make_cfg("trainer.epochs=1", "trainer.batch_size=8", "trainer.max_steps=3", "trainer.eval_batches=2")
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.max_steps, cfg.trainer.eval_batches) == (1, 8, 3, 2)


@pytest.mark.parametrize("group", ["model", "dataset", "method"])
def test_unknown_choice_names_the_options(make_cfg, group):
    with pytest.raises(MissingConfigException) as err:
        make_cfg(f"{group}=nope")
    assert "nope" in str(err.value) and "Available options" in str(err.value)
