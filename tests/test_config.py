"""Every config group choice composes and instantiates the right classes; every setting is checked
(type, range, combination) with one line that names it, its value and a fix."""
from dataclasses import fields
from typing import get_args

import hydra
import pytest
import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf

from experiments.builders.variant import build_variant
from experiments.configuration import choices as literals
from experiments.configuration import schema
from experiments.configuration.schema import ConfigError, validate
from experiments.training import errors
from tests.helpers import CONF, QUICK
from tests.tiny_models import batches
from wasi import EPS_SET, WASIConfig

GROUPS = ["model", "dataset", "method", "hardware", "optimizer", "scheduler", "logger"]


def choices(group: str) -> list[str]:
    return sorted(str(p.relative_to(CONF / group).with_suffix("")) for p in (CONF / group).rglob("*.yaml"))


#: What a choice needs besides the defaults to make a run: a text model a text dataset and the other way round, a
#: generic model config the name of its model.
PARTNERS = {("model", "tinyllama"): ["dataset=yesno"], ("model", "llama_tiny"): ["dataset=yesno"],
            ("dataset", "yesno"): ["model=llama_tiny"], ("dataset", "boolq"): ["model=llama_tiny"],
            ("model", "timm"): ["model.name=deit_tiny_patch16_224"],
            ("model", "hf"): ["model.name=google/vit-base-patch16-224"]}
#: The name a choice gives its node where it is not the file's (paper/wasi_tinyllama is WASI as the authors ran it,
#: wasi_nearest WASI with method.basis=nearest).
NAMES = {"paper/wasi_tinyllama": "wasi", "wasi_nearest": "wasi", "timm": "deit_tiny_patch16_224",
         "hf": "google/vit-base-patch16-224"}


@pytest.mark.parametrize("group,choice", [(g, c) for g in GROUPS for c in choices(g)])
def test_every_choice_composes(make_cfg, group, choice):
    extra = PARTNERS.get((group, choice), [])
    cfg = make_cfg(f"{group}={choice}", *extra)
    need = getattr(OmegaConf.get_type(cfg.method), "optimizer_need", None)  # LoRA-FA, GaLore: optimizer=adamw
    cfg = make_cfg(f"{group}={choice}", *extra, f"optimizer={need.choice}") if need else cfg
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    validate(cfg)  # and every value is allowed
    if group == "optimizer":
        assert issubclass(hydra.utils.instantiate(cfg.optimizer).func, torch.optim.Optimizer)
    elif group == "scheduler":
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        scheduler = hydra.utils.instantiate(cfg.scheduler)(optimizer, steps_per_epoch=3)
        optimizer.step()
        scheduler.step()
    elif group != "logger":
        assert cfg[group].name == NAMES.get(choice, choice.split("/")[-1])  # method=paper/wasi is wasi
    if group == "dataset":
        assert cfg.dataset.source.get("download", False) is False  # never download unless asked


def test_required_groups_and_paper_defaults(make_cfg):
    cfg = make_cfg()
    assert set(GROUPS) <= set(cfg)
    assert set(choices("method")) >= {"vanilla", "asi", "wsi", "wasi"}
    assert set(choices("model")) >= {"vit_b32", "swin_t", "vit_tiny_cpu"}
    assert set(choices("hardware")) >= {"cuda", "cpu_pi"}
    t = cfg.trainer
    assert (t.epochs, t.batch_size, t.grad_clip, cfg.scheduler.min_lr_ratio, cfg.seed) == (50, 128, 2.0, 0.1, 233)
    opt = hydra.utils.instantiate(cfg.optimizer)
    assert opt.func is torch.optim.SGD and opt.keywords == {"lr": 0.05, "momentum": 0.0, "weight_decay": 1e-4}
    assert make_cfg("model=vit_b32").model.timm_name == "vit_base_patch32_224"
    assert make_cfg("model=swin_t").model.timm_name == "swin_tiny_patch4_window7_224"
    assert make_cfg("hardware=cpu_pi").hardware.threads == 4


@pytest.mark.parametrize("method", ["vanilla", "asi", "wsi", "wasi"])
def test_methods_instantiate(make_cfg, method):
    obj = hydra.utils.instantiate(make_cfg(f"method={method}").method)
    assert obj.name == method


# ---------------------------------------------------------------------------------------------
# The schema (experiments/configuration/schema.py): types while composing, ranges and combinations by validate()
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["trainer.epochs=-1"], "trainer.epochs=-1: must be an int >= 1. Fix: trainer.epochs=50"),
    (["trainer.eval_interval=0"], "trainer.eval_interval=0: must be an int >= 1. Fix: trainer.eval_interval=1"),
    (["trainer.batch_size=0"], "trainer.batch_size=0: must be an int >= 1. Fix: trainer.batch_size=128"),
    (["trainer.max_steps=0"], "trainer.max_steps=0: must be an int >= 1. Fix: trainer.max_steps=100, or null"),
    (["trainer.grad_clip=-1"], "trainer.grad_clip=-1.0: must be a number > 0. Fix: trainer.grad_clip=2.0, or null"),
    (["scheduler.min_lr_ratio=2"], "scheduler.min_lr_ratio=2.0: must be in [0, 1]"),
    (["scheduler=warmup_cosine", "scheduler.warmup_epochs=-1"], "scheduler.warmup_epochs=-1.0: must be a number >= 0"),
    (["trainer.label_smoothing=1"], "trainer.label_smoothing=1.0: must be in [0, 1)"),
    (["trainer.shuffle=random"], "trainer.shuffle=random: must be one of per_epoch, continued"),
    (["trainer.eval_batch_size=0"], "trainer.eval_batch_size=0: must be an int >= 1"),
    (["dataset.val_fraction=1"], "dataset.val_fraction=1.0: must be in [0, 1)"),
    (["dataset.num_classes=0"], "dataset.num_classes=0: must be an int >= 1"),
    (["trainer.checkpoint_every=0"], "trainer.checkpoint_every=0: must be an int >= 1"),
    (["optimizer.lr=-1"], "optimizer.lr=-1.0: must be a number > 0. Fix: optimizer.lr=0.05"),
    (["optimizer.momentum=1"], "optimizer.momentum=1.0: must be in [0, 1)"),
    (["optimizer=adamw", "optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1: must be a number >= 0"),
    (["seed=-1"], "seed=-1: must be an int in [0, 2**32 - 1]"),
    (["resume=5"], "resume=5: must be true, false, null, auto or a path to a last.ckpt"),
    (["hardware.precision=fp16"], "hardware.precision=fp16: must be one of fp32, bf16. Fix: hardware.precision=fp32"),
    (["hardware.threads=0"], "hardware.threads=0: must be an int >= 1"),
    (["hardware.dense_linear=mkl"], "hardware.dense_linear=mkl: must be one of aten, onednn"),
    (["hardware=cuda", "hardware.dense_linear=onednn"], "hardware.dense_linear=onednn: oneDNN's linear is the "
     "float32 CPU kernel, and hardware=cuda runs fp32 on cuda. Fix: hardware.dense_linear=aten"),
    (["hardware.precision=bf16", "hardware.dense_linear=onednn"], "hardware.dense_linear=onednn: oneDNN's linear "
     "is the float32 CPU kernel, and hardware=cpu runs bf16 on cpu"),
    (["hardware.dense_linear=onednn"], None),
    (["logger.mode=on"], "logger.mode=on: must be one of offline, online, disabled"),
    (["model.image_size=0"], "model.image_size=0: must be an int >= 1"),
    (["method.targets=all"], "method.targets=all: must be one of mlp, mlp+attn"),
    (["method=lora", "method.r=0"], "method.r=0: must be an int >= 1. Fix: method.r=8"),
    (["method=svd_llm", "method.finetune=full"], "method.finetune=full: must be one of lora, factors"),
    (["method=svd_llm", "method.ratio=1.5"], "method.ratio=1.5: must be in (0, 1]"),
    (["method=wasi", "method.epsilon=1.5"], "method.epsilon=1.5: must be in (0, 1]. Fix: method.epsilon=0.8"),
    (["method=wasi", "method.eps_set=[0.5,1.5]"], "method.eps_set=[0.5,1.5]: must be non-empty with values in (0, 1]. "
     "Fix: method.eps_set=[0.4,0.5,0.6,0.7,0.8,0.9]"),
    (["method=wasi", "method.targets=all"], "method.targets=all: must be one of mlp, mlp+attn. "
     "Fix: method.targets=mlp"),
    (["method=wasi", "method.recompute=all"], "method.recompute=all: must be one of none, mlp, attn, block"),
    (["method=wasi", "method.basis=householder"], "method.basis=householder: must be one of qr, nearest. "
     "Fix: method.basis=qr"),
    (["method=asi", "method.recompute=mlp"], "method.recompute=mlp: recomputes fc1's output from the low-rank x Rᵀ"),
    (["method=wasi", "method.target_modules=[]"], "method.target_modules=[]: names no module"),
    (["method=wasi", "method.budget_mib=-4"], "method.budget_mib=-4.0: must be a number > 0"),
    (["method=wasi", "method.ranks=[8,8,8]", "method.budget_mib=4"],
     "method.ranks=[8,8,8]: method.budget_mib=4.0 also chooses the activation ranks"),
    (["method=wasi", "method.epsilon_act=0.5", "method.ranks=[8,8,8]"],
     "method.epsilon_act=0.5: method.ranks=[8,8,8] also chooses the activation ranks"),
    (["method=wsi", "method.budget_mib=4"], "method.budget_mib=4.0: method=wsi keeps saved activations dense"),
    (["method=wasi", "method.budget_bytes=1048576"], "method.budget_bytes=1048576: the budget is set in MiB. "
     "Fix: method.budget_mib=1 and method.budget_bytes=null"),
    (["method=asi", "optimizer=adamw"], None),  # ASI keeps dense weights: any optimizer
    # The method is what its file's _target_ trains: a name that says otherwise would mislabel the results.
    (["method.name=wasi"], "method.name=wasi: experiments.builders.methods.Vanilla trains vanilla, so its results "
     "would be labelled wasi. Fix: choose the method by its config file, method=<name>"),
    (["method={name:wasi}"], "method.name=wasi: experiments.builders.methods.Vanilla trains vanilla"),
    (["method=wasi", "method.weight=false"], "method.name=wasi: experiments.builders.methods.Subspace with "
     "method.weight=false and method.activation=true trains asi"),
    (["method=lora", "method.name=lora_fa"], "method.name=lora_fa: experiments.builders.methods.Lora trains lora"),
    (["overwrite=true", "resume=true"], "overwrite=true: replaces the run in the run folder, while resume=true "
     "continues one"),
    (["overwrite=true", "resume=auto"], "overwrite=true: replaces the run in the run folder, while resume=auto"),
    (["method=wsi", "optimizer=adamw"], "optimizer._target_=torch.optim.AdamW: method=wsi updates its weight factors"),
])
def test_validate_names_the_setting_its_value_and_a_fix(make_cfg, overrides, message):
    cfg = make_cfg(*overrides)
    if message is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    line = str(err.value)
    assert line.startswith(message) and "\n" not in line and "Fix: " in line


@pytest.mark.parametrize("override, line", [
    ("trainer.epochs=2.5", "trainer.epochs=2.5: must be an integer. Fix: e.g. trainer.epochs=50"),
    ("optimizer.lr=abc", "optimizer.lr=abc: must be a float. Fix: e.g. optimizer.lr=0.05"),
    ("model.pretrained=maybe", "model.pretrained=maybe: must be true or false. Fix: e.g. model.pretrained=false"),
    ("method.ranks=[8,a]", "method.ranks[1]=a: must be an integer. Fix: method.ranks[1]=<value>"),
    ("trainer.epoch=3", "trainer.epoch is not a setting. Fix: did you mean trainer.epochs?"),
    ("model.kwargs.dept=3", "model.kwargs.dept is not a setting. Fix: did you mean model.kwargs.depth? "
     "(a new key needs a leading +)"),
    ("method=nope", "method=nope: there is no conf/method/nope.yaml. Fix: method=<one of asi, galore, lora,"),
    ("experiment=nope", "experiment=nope: there is no conf/experiment/nope.yaml. Fix: experiment=<one of baselines,"),
])
def test_composing_a_wrong_type_or_key_is_one_line(make_cfg, override, line):
    overrides = ["method=wasi", override] if override.startswith("method.") else [override]
    with pytest.raises(HydraException) as err:
        make_cfg(*overrides)
    assert errors.one_line(err.value).startswith(line) and errors.status(err.value) == errors.SETTING


def test_wasi_defaults_are_the_librarys(make_cfg):
    """The epsilon set and the other WASI defaults come from wasi.WASIConfig, written nowhere in conf/, and the
    method object passes them on without declaring them again."""
    for name in ("wasi", "asi", "wsi"):
        written = set(OmegaConf.load(CONF / "method" / f"{name}.yaml"))
        assert not {"eps_set", "epsilon", "epsilon_act", "targets", "last_n", "weight_update"} & written
    cfg = make_cfg("method=wasi")
    library = {f.name: f.default for f in fields(WASIConfig)}
    assert tuple(cfg.method.eps_set) == library["eps_set"] == EPS_SET
    built = hydra.utils.instantiate(cfg.method).config
    for key in ("epsilon", "eps_set", "targets", "last_n", "weight_update", "train_rest"):
        assert cfg.method[key] == library[key] == getattr(built, key), key


@pytest.mark.parametrize("literal, field", [
    (literals.Device, schema.Hardware.__dataclass_fields__["device"]),
    (literals.Precision, schema.Hardware.__dataclass_fields__["precision"]),
    (literals.DenseLinear, schema.Hardware.__dataclass_fields__["dense_linear"]),
    (literals.LoggerMode, schema.Logger.__dataclass_fields__["mode"]),
    (literals.Shuffle, schema.Trainer.__dataclass_fields__["shuffle"]),
    (literals.Recompute, schema.VanillaMethod.__dataclass_fields__["recompute"]),
    (literals.Finetune, schema.SvdLlmMethod.__dataclass_fields__["finetune"]),
])
def test_an_option_allows_exactly_its_literal_values(literal, field):
    rule = field.metadata["rule"]
    assert all(rule.holds(v) for v in get_args(literal)) and not rule.holds("other")
    assert rule.text == "one of " + ", ".join(get_args(literal))


def test_fixed_ranks_reach_every_converted_layer(make_cfg):
    variant = build_variant(make_cfg(*QUICK, "method=wasi", "method.ranks=[4,4,4]"), 10, batches(32, n=1, batch=8),
                            torch.device("cpu"))
    assert [layer["act_ranks"] for layer in variant.summary["layers"]] == [[4, 4, 4]] * 4


@pytest.mark.parametrize("overrides, activation", [
    (["method=wasi"], dict(epsilon_act=0.8, ranks=None, budget_bytes=None)),
    (["method=asi", "method.epsilon=0.6"], dict(epsilon_act=0.6, ranks=None, budget_bytes=None)),
    (["method=wasi", "method.ranks=[8,8,8]"], dict(epsilon_act=None, ranks=[8, 8, 8], budget_bytes=None)),
    (["method=wasi", "method.budget_mib=2"], dict(epsilon_act=None, ranks=None, budget_bytes=2 * 2**20)),
    (["method=wsi"], dict(epsilon_act=None, ranks=None, budget_bytes=None)),
])
def test_ranks_or_a_budget_alone_choose_the_activation_ranks(make_cfg, overrides, activation):
    cfg = make_cfg(*overrides)
    validate(cfg)
    config = hydra.utils.instantiate(cfg.method).config
    assert {k: getattr(config, k) for k in activation} == activation
