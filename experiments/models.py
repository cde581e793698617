"""Build a timm model from the `model` config group, with the head sized for the dataset."""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


class PretrainedWeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but could not be loaded (usually: offline)."""


class CheckpointMismatchError(RuntimeError):
    """A local checkpoint does not fit the configured model."""


def build_model(cfg: DictConfig, num_classes: int) -> nn.Module:
    """timm model `cfg.timm_name` with a fresh `num_classes` head.

    Weights come from `cfg.checkpoint` (a local file) if set, else from the hub if
    `cfg.pretrained`, else random init. Never falls back silently to random weights.
    """
    kwargs = OmegaConf.to_container(cfg.kwargs, resolve=True) if cfg.get("kwargs") else {}
    if cfg.get("checkpoint"):
        model = timm.create_model(cfg.timm_name, pretrained=False, num_classes=num_classes, **kwargs)
        load_checkpoint(model, resolve_checkpoint(cfg.checkpoint))
        return model
    if not cfg.pretrained:
        return timm.create_model(cfg.timm_name, pretrained=False, num_classes=num_classes, **kwargs)
    try:
        return timm.create_model(cfg.timm_name, pretrained=True, num_classes=num_classes, **kwargs)
    except Exception as err:  # hub errors vary by huggingface_hub version; all mean the same here
        raise PretrainedWeightsUnavailableError(
            f"Could not load pretrained weights for '{cfg.timm_name}' ({type(err).__name__}: {err}).\n"
            "Fix: on a machine with internet run `python -c \"import timm; "
            f"timm.create_model('{cfg.timm_name}', pretrained=True)\"` to fill the Hugging Face "
            "cache (HF_HOME) and copy it here, or download the weights file and pass "
            "model.checkpoint=/path/to/model.safetensors, or train from scratch on purpose with "
            "model.pretrained=false."
        ) from err


def resolve_checkpoint(path: str | Path) -> Path:
    """`path` as given if it exists (or is absolute), else relative to the repository root, so a
    checkpoint shipped in the repository (e.g. checkpoints/vit_tiny_fractal.safetensors) is found
    from any working directory."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists() or not (REPO_ROOT / path).exists():
        return path
    return REPO_ROOT / path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch file loaded with weights_only=True."""
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}. Fix: model.checkpoint=/path/to/weights")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common wrappers of training checkpoints
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load weights into `model`; a classifier head of another size is skipped (kept fresh).

    Any other missing, unexpected or wrongly shaped tensor raises CheckpointMismatchError.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    head = {k for k in own if k.startswith(_head_prefix(model))}
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape and k not in head]
    missing = [k for k in own if k not in state and k not in head]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:5]]
        raise CheckpointMismatchError(
            f"Checkpoint {path} does not match model {type(model).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:5]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:5]}), {len(mismatched)} with other shapes {shapes}.\n"
            "Fix: pass a checkpoint of the same architecture as model.timm_name, or choose the "
            "matching model=... config."
        )
    state = {k: v for k, v in state.items() if k not in head or own[k].shape == v.shape}
    model.load_state_dict(state, strict=False)
    log.info("loaded %d tensors from %s", len(state), path)


def _head_prefix(model: nn.Module) -> str:
    """Qualified name of the classifier module, e.g. 'head' or 'head.fc'."""
    classifier = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is classifier)
