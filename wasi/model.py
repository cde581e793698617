"""Injection: convert the target linears of a timm ViT / Swin in place, set what trains, apply the recompute."""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from wasi.blocks import block_of, compressed_modes, compression_views
from wasi.config import TARGETS, WASIConfig
from wasi.layers import ASILinear, WASILinear, WSILinear, track_token_grid
from wasi.mlp import RecomputeMlp
from wasi.ranks import RankTable, build_rank_table, ranks_for, solve_budget
from wasi.recompute import checkpoint_attention, checkpoint_blocks
from wasi.subspace import truncated_hosvd
from wasi.trainable import set_trainable

__all__ = ["InjectionSummary", "LayerSummary", "factored_layers", "find_targets", "inject"]

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
    injection (trainable: as `set_trainable` decided, e.g. converted layers + classifier head).
    recompute: the config's recompute mode; recomputed: the modules it applies to (RecomputeMlp
    names for "mlp", then attention module names for "attn", then block names for "block"). rank_table: the
    budget path's table, else None; save it with `rank_table.to_json()` (it is not part of `to_dict`)."""

    layers: list[LayerSummary]
    trainable_params: int
    total_params: int
    recompute: str = "none"
    recomputed: list[str] = field(default_factory=list)
    rank_table: RankTable | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(l) for l in self.layers], "trainable_params": self.trainable_params,
                "total_params": self.total_params, "recompute": self.recompute, "recomputed": self.recomputed}


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
    """Convert the target linears of `model` in place, set which parameters train and apply the recompute mode.

    Targets: `find_targets(model, config.targets, config.last_n)`; layer i of them seeds its Tucker
    initialisation with config.seed + i. Trainable parameters: `set_trainable(model, all targets,
    config.train_rest, config.last_n)`. Swin MLP inputs are compressed as (B, H, W, C): each such block gets a
    pre-hook telling its converted MLP layers (H, W). config.recompute: "mlp" turns each timm Mlp whose fc1 and
    fc2 were converted into a RecomputeMlp (an Mlp with only fc2 converted stays as it is); "attn" also runs
    `checkpoint_attention(model)` (for ASI only that, as ASI has no low-rank MLP to fuse); "block" runs
    `checkpoint_blocks(model)`, and with low-rank weights (WSI/WASI) first fuses the MLPs it can as "mlp" does,
    so a block being recomputed in backward holds nothing of the hidden width either.
    calibration: (x, y) batch, needed for epsilon_act and for budget_bytes without a rank_table.
    rank_table: reuse a saved table on the budget path instead of building one.
    """
    all_names = find_targets(model, config.targets)
    names = all_names if config.last_n is None else all_names[-config.last_n:]
    if config.activation and config.ranks is not None:
        _check_fixed_ranks(names, config.ranks)
    if config.recompute in ("mlp", "attn") and config.weight:  # before anything changes
        for mlp in _fused_mlps(names):
            RecomputeMlp.check(model.get_submodule(mlp))
    act_ranks, act_eps, table = _activation_ranks(model, names, config, calibration, rank_table)
    layers = []
    for idx, name in enumerate(names):
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)  # find_targets returns nn.Linear modules only
        new = _convert(linear, config, act_ranks.get(name), config.seed + idx)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        o, i = linear.out_features, linear.in_features
        b = 0 if linear.bias is None else o
        k = getattr(new, "rank", None)
        layers.append(LayerSummary(name=name, kind=type(new).__name__, in_features=i, out_features=o,
                                   weight_rank=k, act_ranks=act_ranks.get(name), act_epsilon=act_eps.get(name),
                                   params_before=o * i + b, params_after=(o * i if k is None else k * (o + i)) + b))
    set_trainable(model, all_names, config.train_rest, config.last_n)
    if config.activation:
        for block in sorted({b for b in map(block_of, names) if b is not None}):
            track_token_grid(model.get_submodule(block))
    recomputed: list[str] = []
    if config.recompute in ("mlp", "attn", "block") and config.weight:
        recomputed = _recompute_mlps(model, names, strict=config.recompute != "block")
    if config.recompute == "attn":
        recomputed += checkpoint_attention(model)
    if config.recompute == "block":
        recomputed += checkpoint_blocks(model)
    summary = InjectionSummary(layers=layers, rank_table=table, recompute=str(config.recompute), recomputed=recomputed,
                               trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                               total_params=sum(p.numel() for p in model.parameters()))
    _logger.info("injected %d layers (%s): %d trainable / %d parameters; recompute=%s on %d modules", len(layers),
                 ", ".join(f"{l.name} K={l.weight_rank} r={l.act_ranks}" for l in layers),
                 summary.trainable_params, summary.total_params, config.recompute, len(recomputed))
    return summary


def _check_fixed_ranks(names: list[str], ranks: list[int]) -> None:
    """Fixed ranks need one entry per compressed mode, the same count for every target."""
    modes = sorted({compressed_modes(n) for n in names})
    if len(modes) > 1:
        raise ValueError(f"fixed ranks={ranks} cannot fit these targets: Swin attention inputs are compressed over 3 "
                         "modes and Swin MLP inputs over 4 (B, H, W, C); set method.epsilon_act (or budget) instead "
                         "of ranks, or targets=mlp")
    if len(ranks) != modes[0]:
        layout = "(B, H, W, C) Swin MLP inputs" if modes[0] == 4 else "3-mode inputs such as ViT tokens (B, N, C)"
        raise ValueError(f"ranks={ranks} has {len(ranks)} entries but the targets compress {layout}: give {modes[0]} "
                         f"ranks, one per mode, e.g. method.ranks={[8] * modes[0]}")


def _fused_mlps(names: list[str]) -> list[str]:
    """The `<block>.mlp` modules whose fc1 and fc2 are both among the converted `names`."""
    converted = set(names)
    return [n[: -len(".fc1")] for n in names if n.endswith("mlp.fc1") and n[: -len("fc1")] + "fc2" in converted]


def _recompute_mlps(model: nn.Module, names: list[str], strict: bool = True) -> list[str]:
    """Replace each timm Mlp whose fc1 and fc2 are both in `names` by a RecomputeMlp; returns their names.
    strict=False skips an Mlp that RecomputeMlp cannot take (dropout, a hidden norm) instead of raising."""
    mlps = [n for n in _fused_mlps(names) if strict or _fusable(model.get_submodule(n))]
    for name in mlps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, RecomputeMlp.from_mlp(model.get_submodule(name)))
    return mlps


def _fusable(mlp: nn.Module) -> bool:
    try:
        RecomputeMlp.check(mlp)
    except ValueError:
        return False
    return True


def _convert(linear: nn.Linear, config: WASIConfig, act_ranks: list[int] | None, seed: int) -> nn.Module:
    if not config.activation:
        return WSILinear.from_linear(linear, config.epsilon, config.weight_update)
    assert act_ranks is not None
    if not config.weight:
        return ASILinear.from_linear(linear, act_ranks, seed)
    return WASILinear.from_linear(linear, config.epsilon, act_ranks, config.weight_update, seed)


def _activation_ranks(model: nn.Module, names: list[str], config: WASIConfig,
                      calibration: tuple[Tensor, Tensor] | None, rank_table: RankTable | None
                      ) -> tuple[dict[str, list[int]], dict[str, float], RankTable | None]:
    """Per-layer activation ranks and their ε, from exactly one of config.ranks / epsilon_act / budget_bytes."""
    if not config.activation:
        return {}, {}, None
    if config.ranks is not None:
        return {n: list(config.ranks) for n in names}, {}, None
    if config.epsilon_act is not None:
        if calibration is None:
            raise ValueError("epsilon_act needs a calibration batch: pass calibration=(x, y) to inject")
        return _calibration_ranks(model, names, calibration[0], config.epsilon_act), \
            {n: config.epsilon_act for n in names}, None
    table = rank_table
    if table is None:
        if calibration is None:
            raise ValueError("budget_bytes needs a calibration batch: pass calibration=(x, y) to inject "
                             "or a saved rank_table")
        table = build_rank_table(model, names, calibration[0], calibration[1], config.eps_set)
    if sorted(table.layers) != sorted(names):
        raise ValueError(f"rank_table covers layers {table.layers} but the targets are {names}; "
                         "rebuild it for this model, targets and last_n")
    stale = [n for n, rows in zip(table.layers, table.ranks) if any(len(r) != compressed_modes(n) for r in rows)]
    if stale:
        raise ValueError(f"rank_table ranks of {stale[:3]} do not have one entry per compressed mode (Swin MLP inputs "
                         "are compressed as (B, H, W, C)); rebuild the table with build_rank_table")
    assert config.budget_bytes is not None  # WASIConfig checks that exactly one rank source is set
    assignment = solve_budget(table, config.budget_bytes)
    return ranks_for(table, assignment), assignment, table


def _calibration_ranks(model: nn.Module, names: list[str], x: Tensor, eps: float) -> dict[str, list[int]]:
    """Truncated-HOSVD ranks (explained variance eps per mode) of each target's compressed input on batch x
    (Swin MLP inputs as (B, H, W, C))."""
    ranks: dict[str, list[int]] = {}
    modes = {m: m.training for m in model.modules()}
    with compression_views(model, names) as view:

        def hook(name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
            def fn(module: nn.Module, inputs: tuple, output: Tensor) -> None:
                ranks[name] = [u.shape[1] for u in truncated_hosvd(view(name, inputs[0].detach()), eps)[1]]
            return fn

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
