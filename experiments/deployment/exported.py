"""Load a model exported by `python -m experiments.export` for inference.

Needs only torch, safetensors, the `wasi` library and the model's own library (timm, or transformers for a Hugging
Face model): no training loop, Hydra, W&B or calibration data. An export folder holds `model.json` (an
`ExportSpec`: the architecture, classes, what the model takes, and the low-rank layers to swap in) and
`model.safetensors` (every weight; a low-rank layer stores its factors `L`, `R` and `bias`, every other module its
dense tensors). The architecture is a timm name and kwargs, or a transformers class and its config (the config's
`to_dict()`, so no download is needed); a text model's export also holds its tokenizer (`save_pretrained`'s files).

    model = load_exported("outputs/run/export")                # eval mode, on CPU
    logits = model(model.export_spec.normalize(images))        # images: (B, 3, S, S) in [0, 1]

    tokenizer = load_tokenizer("outputs/run/export")           # a text model
    batch = tokenizer([text], padding="max_length", truncation=True, max_length=spec.max_length, return_tensors="pt")
    logits = model(**batch).logits                             # text: spec.template's fields joined, as in training
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from wasi import WSILinear, replace_module

__all__ = ["FORMAT", "FORMAT_VERSION", "CONFIG_FILE", "WEIGHTS_FILE", "ExportFormatError", "low_rank_linear",
           "LayerSpec", "ExportSpec", "architecture", "build_model", "load_spec", "load_exported", "load_tokenizer"]

log = logging.getLogger(__name__)

FORMAT = "wasi-export"
FORMAT_VERSION = 2  # 2 adds transformers models and text inputs; version 1 files (timm, images) read the same
CONFIG_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
_EXPORT_FIX = "Fix: re-export the run with `python -m experiments.export RUN_DIR --out DIR`."


class ExportFormatError(ValueError):
    """An export folder is corrupted, incomplete, or not a WASI export."""


def low_rank_linear(in_features: int, out_features: int, rank: int, bias: bool = True) -> WSILinear:
    """An empty `wasi.WSILinear` y = (x Rᵀ) Lᵀ + b to load exported factors into.

    x: (…, I) -> (…, O). L: (O, K), R: (K, I), bias: (O,) or None; state_dict `L`, `R`, `bias`.
    """
    return WSILinear(torch.empty(out_features, rank), torch.empty(rank, in_features),
                     torch.empty(out_features) if bias else None)


@dataclass
class LayerSpec:
    """One low-rank layer: qualified module name, shapes, rank K; `source` says what it was trained as."""

    name: str
    in_features: int
    out_features: int
    rank: int
    bias: bool
    source: str
    kind: str = "LowRankLinear"  # y = (x Rᵀ) Lᵀ + b, loaded as a wasi.WSILinear


@dataclass
class ExportSpec:
    """Contents of model.json: everything needed to rebuild the module structure.

    The architecture: `timm_name` and `timm_kwargs` (timm), or `transformers_class` and `transformers_config` (a
    Hugging Face model: its class name and config dict). `inputs`: image (`image_size`, `mean`, `std`: how the
    run's evaluation preprocessed them) or text (`max_length`, the dataset's `template`; the tokenizer files sit
    next to model.json)."""

    timm_name: str | None
    timm_kwargs: dict[str, Any]
    num_classes: int
    image_size: int | None
    mean: list[float]
    std: list[float]
    method: str
    layers: list[LayerSpec] = field(default_factory=list)
    transformers_class: str | None = None
    transformers_config: dict[str, Any] | None = None
    inputs: str = "image"
    max_length: int | None = None
    template: str | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def architecture(self) -> str:
        """The model's name, for messages: the timm name or the transformers class."""
        return str(self.timm_name or self.transformers_class)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = CONFIG_FILE) -> ExportSpec:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ExportFormatError(f"{source} is not valid JSON ({err}); the export is corrupted. "
                                    f"{_EXPORT_FIX}") from err
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ExportFormatError(f"{source} is not a WASI export (format {found!r}, expected {FORMAT!r}). "
                                    f"{_EXPORT_FIX}")
        if raw.get("format_version") not in (1, FORMAT_VERSION):
            raise ExportFormatError(f"{source} has format_version {raw.get('format_version')!r}; this loader reads "
                                    f"versions 1 to {FORMAT_VERSION}. {_EXPORT_FIX}")
        try:
            layers = [LayerSpec(**layer) for layer in raw.pop("layers")]
            return cls(**raw, layers=layers)
        except (KeyError, TypeError) as err:
            raise ExportFormatError(f"{source} has missing or unknown fields ({err}). {_EXPORT_FIX}") from err

    def normalize(self, images: Tensor) -> Tensor:
        """images: (B, 3, S, S) in [0, 1], S = image_size -> (images - mean) / std per channel."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
        return (images - mean) / std


def architecture(spec: ExportSpec) -> nn.Module:
    """The model `spec` names at random init: timm's `timm_name`, or the transformers class built from its config
    (float32, no download)."""
    if spec.timm_name:
        return timm.create_model(spec.timm_name, pretrained=False, num_classes=spec.num_classes, **spec.timm_kwargs)
    import transformers

    config = dict(spec.transformers_config or {})
    cls = getattr(transformers, str(spec.transformers_class), None)
    if cls is None or "model_type" not in config:
        raise ExportFormatError(f"{CONFIG_FILE} names the transformers class {spec.transformers_class!r} with a "
                                f"config of model_type {config.get('model_type')!r}, which this transformers "
                                f"{transformers.__version__} does not have. {_EXPORT_FIX}")
    config_class = transformers.CONFIG_MAPPING[config["model_type"]]
    return cls(config_class.from_dict(config)).float()


def build_model(spec: ExportSpec) -> nn.Module:
    """The model of `spec` (random weights) with every listed layer replaced by a low-rank layer."""
    model = architecture(spec)
    for layer in spec.layers:
        try:
            old = model.get_submodule(layer.name)
        except AttributeError as err:
            raise ExportFormatError(f"layer {layer.name!r} of {CONFIG_FILE} is not a module of "
                                    f"{spec.architecture}. {_EXPORT_FIX}") from err
        shape = (layer.in_features, layer.out_features)
        if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != shape:
            raise ExportFormatError(f"layer {layer.name!r} ({layer.in_features}->{layer.out_features}) does not "
                                    f"replace {old} of {spec.architecture}. {_EXPORT_FIX}")
        replace_module(model, layer.name, low_rank_linear(layer.in_features, layer.out_features, layer.rank,
                                                          layer.bias))
    return model


def load_spec(path: str | Path) -> ExportSpec:
    """The ExportSpec of an export folder."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not an export folder. "
                                "Fix: create one with `python -m experiments.export RUN_DIR --out DIR`.")
    return ExportSpec.from_json(file.read_text(), str(file))


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """Tensors of an export's model.safetensors; checks the file's WASI export tag."""
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; the export is incomplete. {_EXPORT_FIX}")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportFormatError(f"{file} is not a readable safetensors file ({err}); it is corrupted. "
                                f"{_EXPORT_FIX}") from err
    if metadata.get("format") != FORMAT:
        raise ExportFormatError(f"{file} is a safetensors file but not a WASI export (metadata {metadata}). "
                                f"{_EXPORT_FIX}")
    return tensors


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported model and load its weights strictly; returns it in eval mode.

    The spec is attached as `model.export_spec` (input size, mean/std for `spec.normalize`).
    """
    spec = load_spec(path)
    model = build_model(spec)
    state = load_weights(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        raise ExportFormatError(f"{Path(path) / WEIGHTS_FILE} does not match {CONFIG_FILE}: {len(missing)} missing "
                                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                                f"{len(reshaped)} with other shapes {reshaped[:3]}. {_EXPORT_FIX}")
    model.load_state_dict(state, strict=True)
    model.export_spec = spec
    log.info("loaded %s (%s, %d low-rank layers) from %s", spec.architecture, spec.method, len(spec.layers), path)
    return model.to(device).eval()


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a text model's export folder (transformers' AutoTokenizer, no network)."""
    from transformers import AutoTokenizer

    spec = load_spec(path)
    if spec.inputs != "text":
        raise ExportFormatError(f"{path} holds a model of {spec.inputs} inputs, which has no tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ExportFormatError(f"{path} holds no readable tokenizer ({type(err).__name__}: {err}). "
                                f"{_EXPORT_FIX}") from err
