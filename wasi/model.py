"""Injection: convert the target linears of a timm ViT / Swin in place, freeze the rest."""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from wasi.config import TARGETS, WASIConfig
from wasi.layers import ASILinear, WASILinear, WSILinear
from wasi.ranks import RankTable, build_rank_table, ranks_for, solve_budget
from wasi.subspace import truncated_hosvd

__all__ = ["find_targets", "inject", "factored_layers", "InjectionSummary", "LayerSummary"]

_logger = logging.getLogger(__name__)

# timm ViT: blocks.{i}.…; timm Swin: layers.{s}.blocks.{i}.…
_BLOCK = r"^(layers\.\d+\.)?blocks\.\d+\."
_TARGET_PATTERNS = {"mlp": r"mlp\.fc[12]", "mlp+attn": r"(mlp\.fc[12]|attn\.qkv|attn\.proj)"}


@dataclass
class LayerSummary:
    """One converted layer. weight_rank: K (None for ASI); act_ranks: per-mode activation ranks
    before clipping (None for WSI); act_epsilon: the ε behind them (epsilon_act or budget), if any.
    params_before: O·I + O; params_after: paper's count K(O+I) + O for WSI/WASI (either weight
    update), O·I + O for ASI. The bias term is 0 for a layer without bias."""

    name: str
    kind: str
    in_features: int
    out_features: int
    weight_rank: int | None
    act_ranks: list[int] | None
    act_epsilon: float | None
    params_before: int
    params_after: int


@dataclass
class InjectionSummary:
    """What `inject` did. trainable_params / total_params: numel of model parameters after
    injection (trainable: converted layers + classifier head). rank_table: the budget path's table,
    else None; save it with `rank_table.to_json()` (it is not part of `to_dict`)."""

    layers: list[LayerSummary]
    trainable_params: int
    total_params: int
    rank_table: RankTable | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(l) for l in self.layers], "trainable_params": self.trainable_params,
                "total_params": self.total_params}


def find_targets(model: nn.Module, targets: str = "mlp", last_n: int | None = None) -> list[str]:
    """Qualified names of the target nn.Linear modules in forward order (timm ViT `blocks.{i}.mlp.fc1`,
    Swin `layers.{s}.blocks.{i}.mlp.fc1`, …; "mlp+attn" adds `attn.qkv`, `attn.proj`); the last
    `last_n` of them when set."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    pattern = re.compile(_BLOCK + _TARGET_PATTERNS[targets] + "$")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.match(n)]
    if not names:
        raise ValueError(f"no {targets!r} target linears found in {type(model).__name__}: expected timm ViT "
                         "'blocks.<i>.mlp.fc1' or Swin 'layers.<s>.blocks.<i>.mlp.fc1' modules (already injected?)")
    return names if last_n is None else names[-last_n:]


def factored_layers(model: nn.Module) -> list[tuple[str, WSILinear]]:
    """All WSI/WASI layers (either weight update) as (qualified name, layer)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WSILinear)]


def inject(model: nn.Module, config: WASIConfig, calibration: tuple[Tensor, Tensor] | None = None,
           rank_table: RankTable | None = None) -> InjectionSummary:
    """Convert the target linears of `model` in place and freeze everything else but the classifier head.

    calibration: (x, y) batch, needed for epsilon_act and for budget_bytes without a rank_table.
    rank_table: reuse a saved table on the budget path instead of building one.
    Layer i of the targets seeds its Tucker initialisation with config.seed + i.
    """
    names = find_targets(model, config.targets, config.last_n)
    act_ranks, act_eps, table = _activation_ranks(model, names, config, calibration, rank_table)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = []
    for idx, name in enumerate(names):
        linear = model.get_submodule(name)
        new = _convert(linear, config, act_ranks.get(name), config.seed + idx)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        o, i = linear.out_features, linear.in_features
        b = 0 if linear.bias is None else o
        k = getattr(new, "rank", None)
        layers.append(LayerSummary(name=name, kind=type(new).__name__, in_features=i, out_features=o,
                                   weight_rank=k, act_ranks=act_ranks.get(name), act_epsilon=act_eps.get(name),
                                   params_before=o * i + b, params_after=(o * i if k is None else k * (o + i)) + b))
    for p in model.get_classifier().parameters():
        p.requires_grad_(True)
    summary = InjectionSummary(layers=layers, rank_table=table,
                               trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                               total_params=sum(p.numel() for p in model.parameters()))
    _logger.info("injected %d layers (%s): %d trainable / %d parameters", len(layers),
                 ", ".join(f"{l.name} K={l.weight_rank} r={l.act_ranks}" for l in layers),
                 summary.trainable_params, summary.total_params)
    return summary


def _convert(linear: nn.Linear, config: WASIConfig, act_ranks: list[int] | None, seed: int) -> nn.Module:
    if not config.weight:
        return ASILinear.from_linear(linear, act_ranks, seed)
    if not config.activation:
        return WSILinear.from_linear(linear, config.epsilon, config.weight_update)
    return WASILinear.from_linear(linear, config.epsilon, act_ranks, config.weight_update, seed)


def _activation_ranks(model: nn.Module, names: list[str], config: WASIConfig,
                      calibration: tuple[Tensor, Tensor] | None, rank_table: RankTable | None
                      ) -> tuple[dict[str, list[int]], dict[str, float], RankTable | None]:
    """Per-layer activation ranks and their ε, from exactly one of config.ranks / epsilon_act / budget_bytes."""
    if not config.activation:
        return {}, {}, None
    if config.ranks is not None:
        return {n: list(config.ranks) for n in names}, {}, None
    if calibration is None and (config.epsilon_act is not None or rank_table is None):
        source = "epsilon_act" if config.epsilon_act is not None else "budget_bytes"
        raise ValueError(f"{source} needs a calibration batch: pass calibration=(x, y) to inject"
                         + ("" if source == "epsilon_act" else " or a saved rank_table"))
    if config.epsilon_act is not None:
        return _calibration_ranks(model, names, calibration[0], config.epsilon_act), \
            {n: config.epsilon_act for n in names}, None
    table = rank_table if rank_table is not None else build_rank_table(model, names, *calibration, config.eps_set)
    if sorted(table.layers) != sorted(names):
        raise ValueError(f"rank_table covers layers {table.layers} but the targets are {names}; "
                         "rebuild it for this model, targets and last_n")
    assignment = solve_budget(table, config.budget_bytes)
    return ranks_for(table, assignment), assignment, table


def _calibration_ranks(model: nn.Module, names: list[str], x: Tensor, eps: float) -> dict[str, list[int]]:
    """Truncated-HOSVD ranks (explained variance eps per mode) of each target's input on batch x."""
    ranks: dict[str, list[int]] = {}

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            ranks[name] = [u.shape[1] for u in truncated_hosvd(inputs[0].detach(), eps)[1]]
        return fn

    modes = {m: m.training for m in model.modules()}
    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    return ranks
