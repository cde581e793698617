"""Build a model from the `model` config group, with the head sized for the dataset: a timm model here; a config
naming a `builder` (a Hugging Face transformers model: experiments.builders.hub) is built by that function."""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from torch import nn

import wasi
from experiments import REPO_ROOT
from experiments.configuration.schema import ConfigError

log = logging.getLogger(__name__)


HUB_TIMEOUT_S = 5.0  # how long to wait for the Hugging Face hub before calling the machine offline


class PretrainedWeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but could not be loaded (usually: offline)."""


class UnreadableWeightsError(ValueError):
    """`model.checkpoint` is not a weights file (damaged, or something else)."""


class CheckpointMismatchError(RuntimeError):
    """A local checkpoint does not fit the configured model."""


class WeightsNotFoundError(ConfigError, FileNotFoundError):
    """`model.checkpoint` names no file: a wrong setting (exit status 2)."""


def build_model(cfg: DictConfig, num_classes: int) -> nn.Module:
    """timm model `cfg.timm_name` with a fresh `num_classes` head, checked to take `cfg.image_size` images; or, for a
    config with a `builder` (conf/model/hf.yaml, tinyllama.yaml), what that function builds from it.

    Weights come from `cfg.checkpoint` (a local file) if set, else from the hub if
    `cfg.pretrained`, else random init. Never falls back silently to random weights.
    """
    if cfg.get("builder"):
        return get_method(cfg.builder)(cfg, num_classes)
    kwargs = OmegaConf.to_container(cfg.kwargs, resolve=True) if cfg.get("kwargs") else {}
    if cfg.get("checkpoint"):
        model = timm.create_model(cfg.timm_name, pretrained=False, num_classes=num_classes, **kwargs)
        load_checkpoint(model, resolve_checkpoint(cfg.checkpoint))
    elif not cfg.pretrained:
        model = timm.create_model(cfg.timm_name, pretrained=False, num_classes=num_classes, **kwargs)
    else:
        model = pretrained_model(cfg, num_classes, kwargs)
    check_image_size(model, cfg)
    return model


def pretrained_model(cfg: DictConfig, num_classes: int, kwargs: dict) -> nn.Module:
    """timm's pretrained `cfg.timm_name` from the Hugging Face cache, else the hub (one quick reachability
    check first), else PretrainedWeightsUnavailableError naming the offline fixes."""
    repo, cached = hub_weights(cfg.timm_name)
    overlay = {"file": cached} if cached else {}  # in the cache: read it, no network at all
    try:
        if not cached and (unreachable := hub_unreachable(repo)):
            raise ConnectionError(unreachable)
        return timm.create_model(cfg.timm_name, pretrained=True, num_classes=num_classes,
                                 pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as err:  # hub errors vary by huggingface_hub version; all mean the same here
        raise PretrainedWeightsUnavailableError(
            f"Could not load pretrained weights for '{cfg.timm_name}' ({type(err).__name__}: {err}). "
            "Fix: on a machine with internet run `python -c \"import timm; "
            f"timm.create_model('{cfg.timm_name}', pretrained=True)\"` to fill the Hugging Face "
            "cache (HF_HOME) and copy it here, or download the weights file and pass "
            "model.checkpoint=/path/to/model.safetensors, or train from scratch on purpose with "
            "model.pretrained=false."
        ) from err


@torch.no_grad()
def check_image_size(model: nn.Module, cfg: DictConfig) -> None:
    """ConfigError naming model.image_size and the size the model was built for, unless one (1, 3, S, S) image,
    S = cfg.image_size, passes through `model` (eval mode, no gradients; the mode is restored): timm's ViT and
    Swin fix their input size when built and would otherwise stop at the first training step."""
    size, training = int(cfg.image_size), model.training
    device = next(model.parameters()).device
    try:
        model.eval()(torch.zeros(1, 3, size, size, device=device))
    except (AssertionError, RuntimeError, ValueError) as err:
        built = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if cfg.get("builder"):  # a Hugging Face image classifier: built for its config's image_size
            side = getattr(getattr(model, "config", None), "image_size", None)
            raise ConfigError(f"model.image_size={size}: {cfg.hub_id} takes {side}x{side} images "
                              f"({type(err).__name__}: {' '.join(str(err).split())[:200]}). Fix: "
                              f"model.image_size={side}") from err
        takes = f"is built for {built[0]}x{built[1]} images" if built else "does not take them"
        also = f" to build it for {size}x{size}" if built else ""
        kwarg = "model.kwargs.img_size" if "img_size" in (cfg.get("kwargs") or {}) else "+model.kwargs.img_size"
        fix = (f"model.image_size={built[0]}, or {kwarg}={size}{also}" if built else
               "a model.image_size the model takes (see its timm pretrained_cfg input_size)")
        raise ConfigError(f"model.image_size={size}: {cfg.timm_name} {takes} ({type(err).__name__}: "
                          f"{' '.join(str(err).split())[:200]}). Fix: {fix}") from err
    finally:
        model.train(training)


def hub_weights(timm_name: str) -> tuple[str | None, str | None]:
    """The Hugging Face repo timm loads `timm_name`'s pretrained weights from, and the path of those
    weights in the local cache (HF_HOME), None when absent."""
    pretrained = timm.models.get_pretrained_cfg(timm_name)
    repo = pretrained.hf_hub_id if pretrained else None
    if repo is None:
        return None, None
    for filename in (pretrained.hf_hub_filename or "model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            return repo, path
    return repo, None


def hub_unreachable(repo: str | None, timeout_s: float = HUB_TIMEOUT_S, *, filename: str = "model.safetensors",
                    repo_type: str | None = None) -> str | None:
    """Why the hub cannot serve `repo` now (offline mode, no connection within `timeout_s`), or None. One
    request (for `filename` of the model, or `repo_type`, repo) without retries, so an offline machine learns it at
    once instead of after the hub client's retries. An answer from the server (even "not found") counts as
    reachable: the library that loads it reports the rest."""
    if repo is None:
        return None
    if hub_constants.HF_HUB_OFFLINE:
        return f"HF_HUB_OFFLINE is set and {filename} of {repo} is not in the Hugging Face cache"
    url = hf_hub_url(repo, filename, repo_type=repo_type)
    try:
        get_hf_file_metadata(url, timeout=timeout_s)
    except HfHubHTTPError:
        return None
    except Exception as err:  # no network, DNS, proxy, timeout
        return f"cannot reach the Hugging Face hub ({type(err).__name__}: {err}; waited at most {timeout_s:g} s)"
    return None


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
        raise WeightsNotFoundError(f"model.checkpoint={path}: there is no such file. Fix: model.checkpoint=/path/to/"
                                   "weights (a .safetensors file or a PyTorch state_dict), or model.checkpoint=null")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # only the first sentence: torch's goes on to suggest weights_only=False
        reason = f"{type(err).__name__}: {str(err).split('. ')[0][:200]}"
        raise UnreadableWeightsError(
            f"model.checkpoint={path} is not a readable weights file ({reason}). Fix: pass a .safetensors file, or a "
            "PyTorch file holding only tensors (a state_dict), of the architecture model.timm_name") from None
    for key in ("state_dict", "model"):  # common wrappers of training checkpoints
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnreadableWeightsError(f"model.checkpoint={path} holds a {type(state).__name__}, not a state_dict of "
                                     "tensors. Fix: pass the model's weights (a state_dict or a .safetensors file)")
    return state


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load weights into `model`; a classifier head of another size is skipped (kept fresh).

    Any other missing, unexpected or wrongly shaped tensor raises CheckpointMismatchError.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    heads = wasi.find_head(model)
    head = {k for k in own if any(k == h or k.startswith(h + ".") for h in heads)}
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


def head_prefix(model: nn.Module) -> str:
    """Qualified name of the classifier module, e.g. 'head' or 'head.fc'."""
    classifier = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is classifier)
