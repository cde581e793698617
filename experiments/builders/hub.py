"""Build a Hugging Face transformers model from the `model` config group (conf/model/hf.yaml, tinyllama.yaml,
llama_tiny.yaml), with its head sized for the dataset and, for a text model, its tokenizer.

`model.auto_class` (e.g. AutoModelForSequenceClassification, AutoModelForImageClassification) builds the model:
from the hub repo or local folder `model.hub_id` with its weights (`model.pretrained`), or at random init from the
architecture settings `model.config` (which need no download when they name a `model_type`). Offline, a model or
tokenizer that is not in the Hugging Face cache fails after one quick reachability check, in one line naming the fix
(as the timm models of experiments.builders.models do). Models are built in float32 (`hardware.precision` decides
autocast) and without a KV cache (`use_cache=False`: a classifier trains and evaluates on whole sequences, and a
cache would keep every layer's keys and values alive until the step ends).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

import wasi
from experiments.builders.models import (
    CheckpointMismatchError,
    PretrainedWeightsUnavailableError,
    check_image_size,
    hub_unreachable,
    load_checkpoint,
    resolve_checkpoint,
)
from experiments.configuration.schema import ConfigError, invalid

log = logging.getLogger(__name__)

#: Weight files a hub repo may hold, in the order transformers looks for them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class TokenizerUnavailableError(PretrainedWeightsUnavailableError):
    """`model.tokenizer` could not be loaded (usually: offline and not in the Hugging Face cache)."""


def build_hub_model(cfg: DictConfig, num_classes: int) -> nn.Module:
    """`cfg.auto_class` with a fresh `num_classes` head, in training mode: pretrained from `cfg.hub_id` (the cache,
    else the hub) or `cfg.checkpoint` (a local weights file), or at random init from `cfg.config`. A text model gets
    its tokenizer's padding token id and, for `config.vocab_size: null`, its vocabulary size; an image model is
    checked to take `cfg.image_size` images."""
    auto = auto_class(cfg)
    tokenizer = load_tokenizer(cfg) if cfg.inputs == "text" else None
    config = model_config(cfg, num_classes, tokenizer)
    kwargs = OmegaConf.to_container(cfg.kwargs, resolve=True) if cfg.get("kwargs") else {}
    if cfg.pretrained and not cfg.get("checkpoint"):
        model = pretrained(cfg, auto, config, kwargs)
    else:
        model = auto.from_config(config, dtype=torch.float32, **kwargs)
        if cfg.get("checkpoint"):
            load_checkpoint(model, resolve_checkpoint(cfg.checkpoint))
    if cfg.inputs == "image":
        check_image_size(model, cfg)
    else:
        check_max_length(model.config, cfg)
    return model.train()


def auto_class(cfg: DictConfig) -> Any:
    """The transformers class `cfg.auto_class` names; ConfigError if transformers has none of that name."""
    cls = getattr(transformers, str(cfg.auto_class), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise invalid("model.auto_class", cfg.auto_class, "is not a transformers model class",
                      "model.auto_class=AutoModelForSequenceClassification (text) or AutoModelForImageClassification")
    return cls


def settings(cfg: DictConfig) -> dict[str, Any]:
    """`cfg.config` as a plain dict (the architecture settings)."""
    return OmegaConf.to_container(cfg.config, resolve=True) if cfg.get("config") else {}  # type: ignore[return-value]


def model_config(cfg: DictConfig, num_classes: int, tokenizer: PreTrainedTokenizerBase | None) -> PretrainedConfig:
    """The architecture. Pretrained weights: the checkpoint's config.json (hub, cache or folder), which `cfg.config`
    does not change (a setting that differs from it is named in a warning). Random init: `cfg.config` alone when it
    names a `model_type` (no download), else the hub's config.json with `cfg.config` over it. Then `num_labels`,
    no KV cache and, for a text model, the tokenizer's padding token (and, vocab_size null, its size)."""
    own = settings(cfg)
    if tokenizer is not None and "vocab_size" in own and own["vocab_size"] is None:
        own["vocab_size"] = len(tokenizer)
    own_type = own.pop("model_type", None)
    if cfg.pretrained and not cfg.get("checkpoint"):
        config = hub_file(cfg, "config.json", lambda **kw: AutoConfig.from_pretrained(cfg.hub_id, **kw))
        differ = {k: (v, getattr(config, k)) for k, v in own.items() if getattr(config, k, v) != v}
        if differ:
            log.warning("model.config differs from the checkpoint's config.json, which is used: %s", ", ".join(
                f"{k}={mine} (checkpoint: {theirs})" for k, (mine, theirs) in differ.items()))
    elif own_type is not None:
        config = AutoConfig.for_model(own_type, **own)
    else:
        config = hub_file(cfg, "config.json", lambda **kw: AutoConfig.from_pretrained(cfg.hub_id, **own, **kw))
    config.num_labels = num_classes
    config.use_cache = False
    if tokenizer is not None:
        if len(tokenizer) > config.vocab_size:
            raise invalid("model.config.vocab_size", config.vocab_size, f"the tokenizer {cfg.tokenizer} has "
                          f"{len(tokenizer)} tokens, so some token ids would have no embedding",
                          f"model.config.vocab_size={len(tokenizer)}, or null (the tokenizer's size)")
        config.pad_token_id = tokenizer.pad_token_id
    return config


def pretrained(cfg: DictConfig, auto: Any, config: PretrainedConfig, kwargs: dict) -> nn.Module:
    """`auto.from_pretrained(cfg.hub_id)` in float32, from the local folder or the cache without the network, else
    from the hub after one reachability check; otherwise PretrainedWeightsUnavailableError naming the offline fixes.
    Only the classifier head may be missing from the checkpoint or of another size there (it is initialised afresh,
    for the dataset's classes); any other weight that does not load is a CheckpointMismatchError."""
    def load(**extra: Any) -> tuple[nn.Module, dict]:
        return auto.from_pretrained(cfg.hub_id, config=config, dtype=torch.float32, ignore_mismatched_sizes=True,
                                    output_loading_info=True, **kwargs, **extra)

    model, info = hub_file(cfg, WEIGHT_FILES, load)
    heads = wasi.find_head(model)
    keys = [*info.get("missing_keys", []), *info.get("mismatched_keys", [])]
    fresh = [k if isinstance(k, str) else k[0] for k in keys]
    foreign = [k for k in fresh if not any(k == h or k.startswith(h + ".") for h in heads)]
    if foreign:
        raise CheckpointMismatchError(
            f"{cfg.hub_id} does not hold {len(foreign)} weights of the {type(model).__name__} built from its config "
            f"(e.g. {sorted(foreign)[:5]}), which would stay at random init. Fix: a checkpoint of this architecture "
            "(model.hub_id), or model.auto_class for the model the checkpoint is")
    if fresh:
        log.info("%s: the head %s is initialised afresh for %d classes", cfg.hub_id, heads, config.num_labels)
    return model


def hub_file(cfg: DictConfig, files: str | tuple[str, ...], load: Any) -> Any:
    """`load()` for a local folder `cfg.hub_id`; `load(local_files_only=True)` when one of `files` is in the Hugging
    Face cache; else `load()` if the hub answers within seconds. Any failure: PretrainedWeightsUnavailableError."""
    repo = str(cfg.hub_id)
    names = (files,) if isinstance(files, str) else files
    local = Path(repo).expanduser().is_dir()
    cached = not local and any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)
    try:
        if not local and not cached and (unreachable := hub_unreachable(repo, filename=names[0])):
            raise ConnectionError(unreachable)
        return load(local_files_only=True) if cached else load()
    except Exception as err:  # hub errors vary by version; offline, a missing file, a foreign folder: the same fix
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        text = "; t.AutoTokenizer.from_pretrained(r)" if cfg.inputs == "text" else ""
        raise PretrainedWeightsUnavailableError(
            f"Could not load '{repo}' ({reason}). Fix: on a machine with internet run `python -c \"import transformers "
            f"as t; r='{repo}'; t.{cfg.auto_class}.from_pretrained(r){text}\"` to fill the Hugging Face cache "
            "(HF_HOME) "
            "and copy it here, or save the model there with save_pretrained and pass "
            "model.hub_id=/path/to/that/folder, "
            "or build the architecture of model.config at random init on purpose with model.pretrained=false."
        ) from err


def load_tokenizer(cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The tokenizer `cfg.tokenizer` (a local folder, found from the working directory or the repository root, else a
    hub id read from the cache or the hub) with a padding token: its own, else its end-of-sequence token (TinyLlama
    has none; the authors' code does the same). TokenizerUnavailableError naming the fixes when it cannot be read."""
    name = str(cfg.tokenizer)
    folder = resolve_checkpoint(name)
    local = folder.is_dir()
    cached = not local and isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str)
    try:
        if not local and not cached and (unreachable := hub_unreachable(name, filename="tokenizer_config.json")):
            raise ConnectionError(unreachable)
        tokenizer = AutoTokenizer.from_pretrained(str(folder) if local else name, local_files_only=cached)
    except Exception as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        raise TokenizerUnavailableError(
            f"Could not load the tokenizer '{name}' ({reason}). Fix: on a machine with internet run "
            "`python -c \"import "
            f"transformers; transformers.AutoTokenizer.from_pretrained('{name}').save_pretrained('tokenizer')\"`, copy "
            "the folder here and pass model.tokenizer=/path/to/tokenizer (or fill the Hugging Face cache, HF_HOME, and "
            "copy it here); offline, model.tokenizer=checkpoints/words_tokenizer is the shipped word-level "
            "tokenizer of "
            "dataset=yesno (with model.config.vocab_size=null for a model at random init)."
        ) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"model.tokenizer={name} has neither a padding nor an end-of-sequence token, so "
                              "sequences cannot be padded. Fix: a tokenizer folder whose tokenizer_config.json names a "
                              "pad_token")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer %s: padding with its end-of-sequence token %r", name, tokenizer.eos_token)
    return tokenizer


def check_max_length(config: PretrainedConfig, cfg: DictConfig) -> None:
    """ConfigError naming model.max_length when the model has fewer positions than the sequences are long."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and int(cfg.max_length) > positions:
        raise invalid("model.max_length", cfg.max_length, f"{cfg.name} has {positions} positions",
                      f"model.max_length={positions} or less")
