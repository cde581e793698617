"""The config schema: the type and allowed values of every setting, one dataclass per config node.

Importing this module stores the schemas in Hydra's ConfigStore (`register`), which composing conf/
needs: train.py (through experiments.training.errors), experiments.builders.methods (so experiments.builders.variant and
experiments.bench) and tests/conftest.py import it. The YAML files extend the schemas:
`conf/config.yaml` starts from `config_schema` (top-level keys, `trainer`, `paths`, `model`,
`hardware`, `logger`), each `conf/<group>/*.yaml` of the dataset, method, optimizer and scheduler groups
from its own (`/<choice>_<group>_schema@_here_`, or `/dataset_schema@_here_`). So Hydra checks types and
key names while composing (`trainer.epochs=2.5`, `trainer.epoch=3` are refused), and `validate(cfg)` checks
ranges and combinations at the start of a run, before anything is built or written: it converts the
composed config to these dataclasses, whose `__post_init__` raise `ConfigError` (key, value, fix).

Where each thing lives, once:
- values (defaults) in the YAML files, where users read them, with two exceptions: WASI's options, whose
  defaults are `wasi.WASIConfig`'s (`SubspaceMethod` is derived from its fields by `library_fields`, so a
  field added there is a `method.<field>` setting here, and the library's own checks, `wasi.WASIConfigError`,
  read as the suite's), and the contract every dataset config shares (`Dataset`: its `_target_` and the
  defaults of `val_fraction` and `hflip`);
- types and allowed values (ranges) here, on the fields (`setting`), and WASI's in `wasi.WASIConfig`;
  an option with a fixed set of values is a `Literal` type (experiments/configuration/choices.py), whose
  arguments are also its runtime rule (`one_of_literal`; OmegaConf takes such a field as `str`). A `fix`
  text is an example of a valid value, not the default.
"""
from __future__ import annotations

import difflib
import re
import types
from collections.abc import Callable
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, ClassVar, Literal, Optional, Union, get_args, get_origin, get_type_hints

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

import wasi
from experiments.configuration.choices import (
    DenseLinear,
    Device,
    Finetune,
    Inputs,
    LoggerMode,
    Precision,
    Recompute,
    Shuffle,
)
from experiments.configuration.overrides import as_override
from experiments.measurement.units import mib_to_bytes
from wasi.config import TARGETS
from wasi.optim import Basis


class ConfigError(ValueError):
    """A setting has a wrong type, value or combination; the message (one line) names it and a fix."""


def invalid(key: str, value: Any, reason: str, fix: str) -> ConfigError:
    """ConfigError reading `<key>=<value>: <reason>. Fix: <fix>`."""
    return ConfigError(f"{key}={as_override(value)}: {reason}. Fix: {fix}")


# ---------------------------------------------------------------------------------------------
# Allowed values, declared on the fields
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """A constraint on a setting's value: `holds(value)`, said as `text` ("an int >= 1")."""

    text: str
    holds: Callable[[Any], bool]


def at_least(low: int) -> Rule:
    return Rule(f"an int >= {low}", lambda v: v >= low)


POSITIVE = Rule("a number > 0", lambda v: v > 0)
NON_NEGATIVE = Rule("a number >= 0", lambda v: v >= 0)
UNIT = Rule("in (0, 1]", lambda v: 0 < v <= 1)
FRACTION = Rule("in [0, 1)", lambda v: 0 <= v < 1)
CLOSED_UNIT = Rule("in [0, 1]", lambda v: 0 <= v <= 1)
SEED = Rule("an int in [0, 2**32 - 1]", lambda v: 0 <= v < 2**32)


def one_of(*choices: str) -> Rule:
    return Rule("one of " + ", ".join(choices), lambda v: v in choices)


def one_of_literal(options: Any) -> Rule:
    """The rule of a Literal type: one of its arguments."""
    return one_of(*get_args(options))


def setting(rule: Rule, fix: str, default: Any = MISSING) -> Any:
    """A dataclass field whose value must satisfy `rule` (None passes: nullable fields say so in their type).
    `fix`: what to write instead, e.g. "trainer.epochs=50"."""
    return field(default=default, metadata={"rule": rule, "fix": fix})


class Checked:
    """Base of the schemas: `__post_init__` checks every field declared with `setting`.

    `key` is where the node sits in the composed config ("trainer"; "" for the top level)."""

    key: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            rule, value = f.metadata.get("rule"), getattr(self, f.name)
            if rule is not None and value is not None and not rule.holds(value):
                raise invalid(self.path(f.name), value, f"must be {rule.text}", f.metadata["fix"])

    def path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name


# ---------------------------------------------------------------------------------------------
# The groups (values: conf/<group>/*.yaml and conf/config.yaml)
# ---------------------------------------------------------------------------------------------

@dataclass
class Trainer(Checked):
    """`trainer` in conf/config.yaml (its comments say what each knob does)."""

    key: ClassVar[str] = "trainer"
    epochs: int = setting(at_least(1), "trainer.epochs=50")
    batch_size: int = setting(at_least(1), "trainer.batch_size=128")
    max_steps: int | None = setting(at_least(1), "trainer.max_steps=100, or null for no limit")
    eval_batches: int | None = setting(at_least(1), "trainer.eval_batches=10, or null for the whole split")
    eval_interval: int = setting(at_least(1), "trainer.eval_interval=1 (every epoch)")
    grad_clip: float | None = setting(POSITIVE, "trainer.grad_clip=2.0, or null to disable clipping")
    label_smoothing: float = setting(FRACTION, "trainer.label_smoothing=0.0")
    num_workers: int = setting(at_least(0), "trainer.num_workers=0 (load in the main process)")
    shuffle: str = setting(one_of_literal(Shuffle), "trainer.shuffle=per_epoch")
    drop_last: bool = MISSING
    eval_batch_size: int | None = setting(at_least(1), "trainer.eval_batch_size=256, or null (trainer.batch_size)")
    measure: bool = MISSING
    timing_repeats: int = setting(at_least(1), "trainer.timing_repeats=5")
    checkpoint_every: int | None = setting(at_least(1), "trainer.checkpoint_every=100, or null (every epoch)")


@dataclass
class Paths:
    data_dir: str = MISSING
    cache_dir: str = MISSING
    run_dir: str = MISSING


@dataclass
class Model(Checked):
    """conf/model/*.yaml of a timm model (`/timm_model_schema@_here_`): experiments.builders.models.build_model."""

    key: ClassVar[str] = "model"
    name: str = MISSING
    timm_name: str = MISSING
    pretrained: bool = MISSING
    checkpoint: str | None = MISSING
    image_size: int = setting(at_least(1), "model.image_size=224")
    kwargs: dict[str, Any] = field(default_factory=dict)
    inputs: str = setting(one_of("image"), "model.inputs=image (a timm model takes images)", default="image")


@dataclass
class HubModel(Checked):
    """conf/model/*.yaml of a Hugging Face transformers model (`/hub_model_schema@_here_`): an image classifier
    (inputs image, `image_size`) or a sequence classifier (inputs text, `tokenizer`, `max_length`), built by
    experiments.builders.hub (`builder`) as transformers' `auto_class` from the hub repo or local folder `hub_id`, or
    at random init from the architecture settings `config` (model.pretrained=false)."""

    key: ClassVar[str] = "model"
    builder: str = "experiments.builders.hub.build_hub_model"
    name: str = MISSING
    hub_id: str = MISSING
    inputs: str = setting(one_of_literal(Inputs), "model.inputs=text (token ids), or image")
    auto_class: str = MISSING
    pretrained: bool = MISSING
    checkpoint: str | None = MISSING
    config: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = setting(at_least(1), "model.image_size=224")
    tokenizer: str | None = MISSING
    max_length: int | None = setting(at_least(1), "model.max_length=128")
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        needs = {"image": [("image_size", "model.image_size=224")],
                 "text": [("tokenizer", f"model.tokenizer={self.hub_id} (a hub id or a tokenizer folder)"),
                          ("max_length", "model.max_length=128")]}[self.inputs]
        for key, fix in needs:
            if getattr(self, key) is None:
                raise invalid(f"model.{key}", None, f"model.inputs={self.inputs} needs it", fix)


@dataclass
class Hardware(Checked):
    """conf/hardware/*.yaml."""

    key: ClassVar[str] = "hardware"
    name: str = MISSING
    device: str = setting(one_of_literal(Device), "hardware=cpu or hardware=cuda")
    threads: int | None = setting(at_least(1), "hardware.threads=4, or null (PyTorch's default)")
    precision: str = setting(one_of_literal(Precision), "hardware.precision=fp32")
    dense_linear: str = setting(one_of_literal(DenseLinear), "hardware.dense_linear=aten")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_dense_linear(self)


def check_dense_linear(hw: Any) -> None:
    """hardware.dense_linear=onednn needs float32 on the CPU (a Hardware or the composed `hardware` node)."""
    if hw.dense_linear != "onednn":
        return
    if (hw.device, hw.precision) != ("cpu", "fp32"):
        raise invalid("hardware.dense_linear", "onednn", "oneDNN's linear is the float32 CPU kernel, and "
                      f"hardware={hw.name} runs {hw.precision} on {hw.device}", "hardware.dense_linear=aten")
    if not torch._C._has_mkldnn:
        raise invalid("hardware.dense_linear", "onednn", f"this PyTorch ({torch.__version__}) is built without "
                      "oneDNN", "hardware.dense_linear=aten, or a PyTorch wheel from PyPI")


@dataclass
class Logger(Checked):
    """conf/logger/wandb.yaml."""

    key: ClassVar[str] = "logger"
    mode: str = setting(one_of_literal(LoggerMode), "logger.mode=offline")
    init_timeout: float = setting(POSITIVE, "logger.init_timeout=5 (seconds; 60 on a slow network)")
    project: str = MISSING
    entity: str | None = MISSING
    tags: list[str] = field(default_factory=list)


@dataclass
class Partial(Checked):
    """A node that `hydra.utils.instantiate` makes a partial of `_target_`, which the loop calls later
    (an optimizer with the parameters, a scheduler with the optimizer)."""

    _target_: str = MISSING
    _partial_: bool = True


@dataclass
class SGD(Partial):
    """conf/optimizer/sgd.yaml: torch.optim.SGD (and wasi.SubspaceSGD for WSI/WASI layers)."""

    key: ClassVar[str] = "optimizer"
    lr: float = setting(POSITIVE, "optimizer.lr=0.05")
    momentum: float = setting(FRACTION, "optimizer.momentum=0.9, or 0 for none")
    weight_decay: float = setting(NON_NEGATIVE, "optimizer.weight_decay=1e-4")


@dataclass
class AdamW(Partial):
    """conf/optimizer/adamw.yaml."""

    key: ClassVar[str] = "optimizer"
    lr: float = setting(POSITIVE, "optimizer.lr=1e-3")
    weight_decay: float = setting(NON_NEGATIVE, "optimizer.weight_decay=0.05")


@dataclass
class CosineSchedule(Partial):
    """conf/scheduler/cosine.yaml: experiments.training.schedules.cosine."""

    key: ClassVar[str] = "scheduler"
    epochs: int = setting(at_least(1), "scheduler.epochs=${trainer.epochs}")
    min_lr_ratio: float = setting(CLOSED_UNIT, "scheduler.min_lr_ratio=0.1")


@dataclass
class WarmupCosineSchedule(CosineSchedule):
    """conf/scheduler/warmup_cosine.yaml: experiments.training.schedules.warmup_cosine."""

    warmup_epochs: float = setting(NON_NEGATIVE, "scheduler.warmup_epochs=1")


@dataclass
class Dataset(Checked):
    """conf/dataset/*.yaml (`/dataset_schema@_here_`): the contract every dataset config shares. The loop
    calls `hydra.utils.instantiate(cfg.dataset)(image_size=S, seed=s)`, i.e. experiments.data.datasets.
    build_datasets with `source` (itself a partial: the raw splits' loader) and these keys. The defaults
    here (the target, `val_fraction`, `hflip`) hold unless a dataset's file sets its own."""

    key: ClassVar[str] = "dataset"
    _target_: str = "experiments.data.datasets.build_datasets"
    _partial_: bool = True
    name: str = MISSING
    num_classes: int = setting(at_least(1), "dataset.num_classes=10")
    mean: list[float] = MISSING
    std: list[float] = MISSING
    val_fraction: float = setting(FRACTION, "dataset.val_fraction=0.2", default=0.2)
    hflip: bool = False  # random horizontal flips of training images
    source: Any = field(default_factory=lambda: {"_partial_": True})
    inputs: ClassVar[str] = "image"  # what it gives (not a key: the builder takes every key)


@dataclass
class TextDataset(Checked):
    """conf/dataset/*.yaml of a text classification task (`/text_dataset_schema@_here_`). The loop calls
    `hydra.utils.instantiate(cfg.dataset)(tokenizer=..., max_length=L, seed=s)`, i.e. experiments.data.text.
    build_text_datasets: `source` loads the raw splits (fields such as question and passage, and a label), and
    `template` joins each item's fields into the one string the model's tokenizer reads."""

    key: ClassVar[str] = "dataset"
    _target_: str = "experiments.data.text.build_text_datasets"
    _partial_: bool = True
    name: str = MISSING
    num_classes: int = setting(at_least(1), "dataset.num_classes=2")
    template: str = MISSING
    val_fraction: float = setting(FRACTION, "dataset.val_fraction=0.1", default=0.2)
    source: Any = field(default_factory=lambda: {"_partial_": True})
    inputs: ClassVar[str] = "text"


#: What each kind of input is, and a model and a dataset config that take or give it (for the messages).
INPUT_KINDS: dict[str, tuple[str, str, str]] = {
    "image": ("images", "model=vit_tiny_cpu", "dataset=shapes"),
    "text": ("text (token ids and an attention mask)", "model=llama_tiny", "dataset=yesno"),
}


def check_inputs(model: Any, dataset: Any) -> None:
    """ConfigError naming both settings when the model takes another kind of input than the dataset gives (an image
    model with a text dataset, a text model with an image dataset). model, dataset: the composed nodes or their
    schema objects; one without `inputs` is an image one."""
    def get(node: Any, key: str, default: Any = None) -> Any:
        if isinstance(node, DictConfig):  # a key, else the schema's class attribute (a dataset's `inputs`)
            return node.get(key, getattr(OmegaConf.get_type(node), key, default))
        return node.get(key, default) if isinstance(node, dict) else getattr(node, key, default)

    takes, gives = get(model, "inputs", "image"), get(dataset, "inputs", "image")
    if takes != gives:
        raise ConfigError(
            f"model.name={get(model, 'name')} takes {INPUT_KINDS[takes][0]} and "
            f"dataset.name={get(dataset, 'name')} gives "
            f"{INPUT_KINDS[gives][0]}: the model cannot read the data. Fix: a {takes} dataset for this model (e.g. "
            f"{INPUT_KINDS[takes][2]}), or {'an' if gives == 'image' else 'a'} {gives} model for this dataset "
            f"(e.g. {INPUT_KINDS[gives][1]})")


# ---------------------------------------------------------------------------------------------
# Methods (conf/method/*.yaml -> experiments.builders.methods)
# ---------------------------------------------------------------------------------------------

TARGETS_RULE = one_of(*TARGETS)


@dataclass
class VanillaMethod(Checked):
    key: ClassVar[str] = "method"
    _target_: str = MISSING
    name: str = MISSING
    targets: str = setting(TARGETS_RULE, "method.targets=mlp")
    last_n: int | None = setting(at_least(1), "method.last_n=4, or null for every block")
    train_rest: bool = MISSING
    recompute: str = setting(one_of_literal(Recompute), "method.recompute=none, attn or block (recompute=mlp "
                             "needs the low-rank layers of method=wsi or method=wasi)")


@dataclass
class LoraMethod(VanillaMethod):
    r: int = setting(at_least(1), "method.r=8")
    alpha: float = setting(POSITIVE, "method.alpha=16")
    dropout: float = setting(FRACTION, "method.dropout=0.0")


@dataclass
class SvdLlmMethod(VanillaMethod):
    ratio: float | None = setting(UNIT, "method.ratio=0.5, or null (the rank WASI's epsilon gives)")
    epsilon: float = setting(UNIT, "method.epsilon=0.8")
    calib_samples: int = setting(at_least(1), "method.calib_samples=256")
    finetune: str = setting(one_of_literal(Finetune), "method.finetune=lora")
    r: int = setting(at_least(1), "method.r=8")
    alpha: float = setting(POSITIVE, "method.alpha=16")
    cache: str | None = MISSING


@dataclass(frozen=True)
class OptimizerNeed:
    """The optimizer group a method builds its own optimizer from: conf/optimizer/<choice>.yaml, whose
    `_target_` is `target`; `builds` names what the method builds (for the message)."""

    choice: str
    target: str
    builds: str


@dataclass
class PretrainMethod(Checked):
    """conf/method/pretrain.yaml: experiments.builders.methods.Pretrain (experiment=pretrain)."""

    key: ClassVar[str] = "method"
    _target_: str = MISSING
    name: str = MISSING


@dataclass
class VeloraMethod(LoraMethod):
    """conf/method/velora.yaml: PEFT's VeLoRA options (peft.VeloraConfig) on top of LoRA's."""

    num_groups: int = setting(at_least(1), "method.num_groups=32")
    scale: float = setting(POSITIVE, "method.scale=0.1")
    init_type: str = setting(one_of("batch_average_once", "batch_average", "random"),
                             "method.init_type=batch_average_once")


@dataclass
class LoraFaMethod(LoraMethod):
    """conf/method/lora_fa.yaml: LoRA's options; the optimizer is PEFT's LoRA-FA (AdamW settings)."""

    optimizer_need: ClassVar[OptimizerNeed] = OptimizerNeed("adamw", "torch.optim.AdamW", "PEFT's LoRA-FA optimizer")


@dataclass
class GaloreMethod(VanillaMethod):
    """conf/method/galore.yaml: galore_torch.GaLoreAdamW's projection settings (AdamW settings otherwise)."""

    optimizer_need: ClassVar[OptimizerNeed] = OptimizerNeed("adamw", "torch.optim.AdamW", "galore_torch.GaLoreAdamW")
    rank: int = setting(at_least(1), "method.rank=4")
    update_proj_gap: int = setting(at_least(1), "method.update_proj_gap=500")
    scale: float = setting(POSITIVE, "method.scale=4")
    proj_type: str = setting(one_of("std", "reverse_std", "right", "left", "full"), "method.proj_type=std")


def library_fields(config: type, key: str) -> list[tuple[str, Any, Any]]:
    """`config`'s dataclass fields as `make_dataclass` takes them, in types OmegaConf accepts: a `Literal` of
    choices becomes `str` checked by `one_of` (`Optional[str]` when None is allowed), a union of several types
    (`list[str] | str | None`) becomes `Any` (the library checks it), anything else stays; defaults are config's."""
    hints = get_type_hints(config)
    out = []
    for f in fields(config):
        annotation, rule = _omegaconf_type(hints[f.name])
        default = f.default if f.default is not NO_DEFAULT else f.default_factory()  # type: ignore[misc,operator]
        meta = {"rule": rule, "fix": f"{key}.{f.name}={as_override(default)}"} if rule is not None else {}
        out.append((f.name, annotation, field(default=default, metadata=meta)))
    return out


def _omegaconf_type(annotation: Any) -> tuple[Any, Rule | None]:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return str, one_of_literal(annotation)
    if origin in (Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1:
            inner, rule = _omegaconf_type(kinds[0])
            return Optional[inner], rule  # noqa: UP045  (OmegaConf reads typing's Optional)
        return Any, None
    return annotation, None


def library_error(err: wasi.WASIConfigError) -> ConfigError:
    """A WASIConfig check's error (field, value, reason, fix) in the suite's terms: `method.<field>=...`."""
    fix = err.fix if isinstance(err.fix, str) else " and ".join(
        f"method.{k}={as_override(v)}" for k, v in err.fix.items())
    return invalid(f"method.{err.field}", err.value, err.reason, fix)


def _subspace_post_init(self: Any) -> None:
    Checked.__post_init__(self)
    if self.budget_bytes is not None:
        raise invalid("method.budget_bytes", self.budget_bytes, "the budget is set in MiB",
                      f"method.budget_mib={self.budget_bytes / 2**20:g} and method.budget_bytes=null")
    chosen = {k: v for k, v in (("epsilon_act", self.epsilon_act), ("ranks", self.ranks),
                                ("budget_mib", self.budget_mib)) if v is not None}
    if not self.activation and chosen:
        k, v = next(iter(chosen.items()))
        raise invalid(f"method.{k}", v, f"method={self.name} keeps saved activations dense, so activation "
                      "ranks do not apply", f"drop method.{k} (null), or use method=asi or method=wasi")
    if len(chosen) > 1:
        (k1, v1), (k2, v2) = list(chosen.items())[:2]
        raise invalid(f"method.{k1}", v1, f"method.{k2}={as_override(v2)} also chooses the activation ranks",
                      "keep one of method.epsilon_act, method.ranks, method.budget_mib and set the others to null")
    self.budget_bytes = None if self.budget_mib is None else mib_to_bytes(self.budget_mib)
    try:
        wasi.WASIConfig(**{f.name: getattr(self, f.name) for f in fields(wasi.WASIConfig)})
    except wasi.WASIConfigError as err:  # the library's own checks (ranges of epsilon, eps_set, ...)
        raise library_error(err) from err


#: conf/method/wasi.yaml (asi.yaml and wsi.yaml extend it): every wasi.WASIConfig field (`library_fields`) between
#: the suite's keys. The activation budget is `budget_mib` (MiB); the library's `budget_bytes` is derived from it
#: and is not a setting. `basis` is wasi.SubspaceSGD's (the orthonormal basis its factored step takes).
SubspaceMethod = make_dataclass(
    "SubspaceMethod",
    [("_target_", str, field(default=MISSING)),
     ("_convert_", str, field(default="all")),  # plain lists (ranks, eps_set, target_modules) for wasi.WASIConfig
     ("name", str, field(default=MISSING)),
     *library_fields(wasi.WASIConfig, "method"),
     ("budget_mib", Optional[float], setting(POSITIVE, "method.budget_mib=64, or null")),  # noqa: UP045
     ("basis", str, setting(one_of_literal(Basis), "method.basis=qr (the method's) or method.basis=nearest")),
     ("rank_table", Optional[str], field(default=MISSING))],  # noqa: UP045
    bases=(Checked,), namespace={"key": "method", "__post_init__": _subspace_post_init,
                                 "__module__": __name__, "__doc__": "wasi.WASIConfig's fields and the suite's keys."})


# ---------------------------------------------------------------------------------------------
# The whole config
# ---------------------------------------------------------------------------------------------

@dataclass
class Config(Checked):
    """conf/config.yaml. `method`, `optimizer` and `scheduler` take the schema their YAML file names."""

    seed: int = setting(SEED, "seed=233")
    resume: Any = MISSING
    overwrite: bool = MISSING
    trainer: Trainer = MISSING
    paths: Paths = MISSING
    model: Any = MISSING  # the schema its YAML file names: Model (timm) or HubModel
    dataset: Any = MISSING  # Dataset (images) or TextDataset
    method: Any = MISSING
    hardware: Hardware = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    logger: Logger = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        check_inputs(self.model, self.dataset)
        if not (self.resume is None or isinstance(self.resume, (bool, str))):
            raise invalid("resume", self.resume, "must be true, false, null, auto or a path to a last.ckpt",
                          "resume=true with hydra.run.dir=<the interrupted run's folder>")
        if self.overwrite and self.resume not in (None, False):
            raise invalid("overwrite", True, "replaces the run in the run folder, while "
                          f"resume={as_override(self.resume)} continues one",
                          "keep one of them: overwrite=true to start over, or resume to continue")
        self.check_method()
        target = self.optimizer.get("_target_") if isinstance(self.optimizer, dict) else self.optimizer._target_
        if getattr(self.method, "weight", False) and target != "torch.optim.SGD":
            raise invalid("optimizer._target_", target, f"method={self.method.name} updates its weight factors with "
                          "the subspace SGD step (docs/method.md, Factored update)", "optimizer=sgd")
        need = getattr(self.method, "optimizer_need", None)
        if need is not None and target != need.target:
            raise invalid("optimizer._target_", target, f"method={self.method.name} trains with {need.builds}, "
                          f"built from the {need.choice} settings", f"optimizer={need.choice}")

    def check_method(self) -> None:
        """The method is what its `_target_` class trains with these settings (its `identity`, one place): a
        `method.name` that says otherwise (an override of it, or of what decides it, e.g. method.weight) would
        label one method's results with another's name."""
        from hydra.utils import get_class  # the builders import this module

        target = getattr(self.method, "_target_", None)
        try:
            identity = getattr(get_class(str(target)), "identity")  # noqa: B009  (a class of unknown kind)
        except Exception:  # not a method class of the suite's kind: building it reports what is wrong
            return
        trains, because = identity(self.method)
        if trains != self.method.name:
            raise invalid("method.name", self.method.name, f"{target}{because} trains {trains}, so its results "
                          f"would be labelled {self.method.name}", "choose the method by its config file, "
                          f"method=<name>, which sets method.name (method={trains} is what these settings train)")


SCHEMAS = {"config_schema": Config, "timm_model_schema": Model, "hub_model_schema": HubModel,
           "dataset_schema": Dataset, "text_dataset_schema": TextDataset, "vanilla_method_schema": VanillaMethod,
           "lora_method_schema": LoraMethod, "svd_llm_method_schema": SvdLlmMethod,
           "velora_method_schema": VeloraMethod, "lora_fa_method_schema": LoraFaMethod,
           "galore_method_schema": GaloreMethod, "pretrain_method_schema": PretrainMethod,
           "wasi_method_schema": SubspaceMethod, "sgd_optimizer_schema": SGD, "adamw_optimizer_schema": AdamW,
           "cosine_scheduler_schema": CosineSchedule, "warmup_cosine_scheduler_schema": WarmupCosineSchedule}


def register() -> None:
    """Store the schemas in Hydra's ConfigStore under the names conf/ uses (no group, so `--help` does
    not list them as choices). Runs when this module is imported."""
    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(name=name, node=node)


register()


def validate(cfg: DictConfig) -> None:
    """Check every setting of a composed config: each schema's ranges, then the combinations. Raises
    ConfigError naming the key, its value and a fix; builds nothing."""
    try:
        OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # a missing value, or an interpolation that resolves to a wrong type
        raise from_omegaconf(err) from err


def from_omegaconf(err: OmegaConfBaseException) -> ConfigError:
    """OmegaConf's multi-line error about one key (a wrong type, an unknown key, a missing value) as a
    ConfigError line; for a wrong type, the value the key held before the override makes the example."""
    key = err.full_key or "?"
    reason = (err.msg or str(err)).splitlines()[0]
    if isinstance(err, (ConfigAttributeError, ConfigKeyError)) and err.parent_node is not None:
        open_keys = OmegaConf.get_type(err.parent_node) is dict  # a plain mapping (e.g. model.kwargs) takes new keys
        fix = unknown_key_fix(key, list(err.parent_node.keys()))
        fix += " (a new key needs a leading +)" if open_keys else ""
        return ConfigError(f"{key} is not a setting. Fix: {fix}")
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(f"{key} has no value. Fix: set {key}=<value>")
    if isinstance(err, ValidationError):
        wanted = re.search(r"(?:converted to|is not a valid) (\w+)", reason)
        reason = f"must be {TYPE_WORDS.get(wanted[1].lower(), wanted[1].lower())}" if wanted else reason
        before = value_before(err)
        fix = f"e.g. {key}={as_override(before)}" if before is not None else f"{key}=<value>"
        return invalid(key, err.value, reason, fix)
    return ConfigError(f"{key}: {reason}")


#: How OmegaConf's type names read in "must be ...".
TYPE_WORDS = {"float": "a float", "integer": "an integer", "bool": "true or false", "str": "a string"}


def value_before(err: OmegaConfBaseException) -> Any:
    """The value `err.key` held before a failed override (None if there is none to show)."""
    try:
        return err.parent_node[err.key]
    except Exception:  # no parent, a list index, a missing or unresolvable value: no example then
        return None


def unknown_key_fix(key: str, known: list[str]) -> str:
    """'did you mean trainer.epochs?' (a setting with a similar name), else the settings next to it."""
    parent, _, name = key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    close = difflib.get_close_matches(name, known, n=1)
    listed = ", ".join(k for k in known if k != "hydra")
    return f"did you mean {prefix}{close[0]}?" if close else f"use one of {prefix}{{{listed}}}"
