"""Injection: convert a model's target linears in place, set what trains, apply the recompute; rebuild it later.

`inject` looks at the model once on a calibration batch (wasi.probe): which targets run, what each receives (so how
many modes its input is compressed over), and that each MLP it fuses computes what its form says. `rebuild` takes
`InjectionSummary.to_config()` and re-creates the same structure on a fresh copy of the model without any data, so
a saved `state_dict` loads into it with strict=True.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from wasi.adapters import adapter_for, replace_module
from wasi.blocks import enclosing, find_blocks
from wasi.config import WASIConfig
from wasi.layers import ASILinear, WASILinear, WSILinear, track_token_grid
from wasi.mlp import MlpForm, form_of, fuse
from wasi.probe import Inputs, Seen, observe
from wasi.ranks import RankTable, build_rank_table, ranks_for, solve_budget
from wasi.recompute import checkpoint_attention, checkpoint_blocks
from wasi.targets import Mlp, find_mlps, find_targets, tuned_targets
from wasi.trainable import set_trainable, trained_modules

__all__ = ["InjectionSummary", "LayerSummary", "factored_layers", "find_targets", "inject", "rebuild"]

_logger = logging.getLogger(__name__)

_FORMAT, _VERSION = "wasi.injection", 1


@dataclass
class LayerSummary:
    """One converted layer. kind: ASILinear, WSILinear or WASILinear; base: the layer type it replaced (wasi.adapters);
    weight_rank: K (None for ASI); act_ranks: per-mode activation ranks before clipping (None for WSI); act_epsilon:
    the ε behind them (epsilon_act or budget), if any; input_shape: what it compresses on the calibration batch
    (its block's (B, H, W, C) map when `grid`). params_before: O·I + O; params_after: paper's count K(O+I) + O for
    WSI/WASI (either weight update), O·I + O for ASI. The bias term is 0 for a layer without bias. seed: its Tucker
    initialisation's; batch_rank_cap: see wasi.layers."""

    name: str
    kind: str
    in_features: int
    out_features: int
    weight_rank: int | None
    act_ranks: list[int] | None
    act_epsilon: float | None
    params_before: int
    params_after: int
    base: str = "Linear"
    bias: bool = True
    input_shape: list[int] = field(default_factory=list)
    grid: bool = False
    seed: int = 0
    batch_rank_cap: int | None = None


@dataclass
class InjectionSummary:
    """What `inject` did. trainable_params / total_params: numel of model parameters after injection (trainable:
    as `set_trainable` decided). trains: what trains (wasi.trainable.trained_modules). recompute: the recompute mode
    in effect; fused_mlps: the MLP modules running the fused recompute; checkpointed_attention: the attention
    modules and checkpointed_blocks: the blocks recomputed in backward; recomputed: the three lists. grid_blocks:
    the blocks telling their MLP layers (H, W). rank_table: the budget path's table, else None; save it with
    `rank_table.to_json()` (it is not part of `to_dict`). config: the WASIConfig used. `to_config()` is what
    `rebuild` needs."""

    layers: list[LayerSummary]
    trainable_params: int
    total_params: int
    recompute: str = "none"
    recomputed: list[str] = field(default_factory=list)
    rank_table: RankTable | None = field(default=None, repr=False)
    trains: list[str] = field(default_factory=list)
    fused_mlps: list[str] = field(default_factory=list)
    checkpointed_blocks: list[str] = field(default_factory=list)
    checkpointed_attention: list[str] = field(default_factory=list)
    grid_blocks: list[str] = field(default_factory=list)
    config: WASIConfig | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(l) for l in self.layers], "trainable_params": self.trainable_params,
                "total_params": self.total_params, "recompute": self.recompute, "recomputed": self.recomputed,
                "trains": self.trains, "fused_mlps": self.fused_mlps, "checkpointed_blocks": self.checkpointed_blocks,
                "checkpointed_attention": self.checkpointed_attention}

    def to_config(self) -> dict[str, Any]:
        """A JSON-able record of the converted structure (config, every layer's type, K, ranks and seed, the fused
        MLPs, checkpointed attention modules and blocks, grid blocks) for `rebuild`; it holds no weights."""
        if self.config is None:
            raise ValueError("this summary has no config; take it from inject or rebuild")
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}
        return {"format": _FORMAT, "version": _VERSION, "config": config, "layers": [asdict(l) for l in self.layers],
                "fused_mlps": self.fused_mlps, "checkpointed_blocks": self.checkpointed_blocks,
                "checkpointed_attention": self.checkpointed_attention, "grid_blocks": self.grid_blocks}


def factored_layers(model: nn.Module) -> list[tuple[str, WSILinear]]:
    """All WSI/WASI layers (either weight update) as (qualified name, layer)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WSILinear)]


def inject(model: nn.Module, config: WASIConfig, calibration: tuple[Inputs, Tensor | None] | None = None,
           rank_table: RankTable | None = None) -> InjectionSummary:
    """Convert the target linears of `model` in place, set which parameters train and apply the recompute mode.

    calibration: (x, y), one batch: x the model input (a tensor, or a mapping of keyword inputs as Hugging Face
    models take); y the labels, needed only for a budget without a rank_table (loss: cross entropy of the logits).
    inject runs the model on x once (eval mode, no grad) and refuses, naming the modules and the fix: a target that
    never runs (its parent calls F.linear on its weight), fixed `ranks` that do not fit what the targets compress,
    and with recompute="mlp" an MLP the fused path cannot take (with the default recompute, or "attn", such an MLP is
    left as it is and named in a warning).
    Targets: `find_targets(model, config.targets, config.last_n, config.target_modules)`; layer i of them seeds its
    Tucker initialisation with config.seed + i. Trainable parameters: `set_trainable(model, every target,
    config.train_rest, config.last_n, config.modules_to_save)`. An MLP linear fed (B, H·W, C) in a block fed a
    channels-last map compresses (B, H, W, C): the block gets a pre-hook telling the layer (H, W).
    config.recompute_mode "mlp": each MLP whose linears are all converted (WSI/WASI) runs fused (wasi.mlp); "attn":
    `checkpoint_attention(model)`, the MLPs fused as "mlp" does; "block": `checkpoint_blocks(model)`, after fusing
    the MLPs it can as "mlp" does.
    rank_table: reuse a saved table on the budget path instead of building one.
    """
    if calibration is None:
        raise ValueError("inject needs a calibration batch: pass calibration=(x, y) (y may be None unless a "
                         "budget_bytes has no rank_table); it checks which targets run and what each one receives")
    x, y = calibration
    all_names = find_targets(model, config.targets, target_modules=config.target_modules)
    names = tuned_targets(model, all_names, config.last_n)
    mode, strict = config.recompute_mode, config.recompute == "mlp"
    blocks = find_blocks(model)
    candidates = [m for m in find_mlps(model, blocks) if set(m.linears) <= set(names)] \
        if config.weight and mode in ("mlp", "attn", "block") else []
    from_eps = config.activation and config.epsilon_act is not None
    seen, eps_ranks, computes = observe(model, names, x, config.epsilon_act if from_eps else None,
                                        [m for m in candidates if m.form.fusable])
    _refuse_bypassed(names, seen, config)
    if config.activation and config.ranks is not None:
        _check_fixed_ranks(names, config.ranks, seen)
    fusing = _plan_fusion(model, candidates, computes, strict, mode)
    act_ranks, act_eps, table = _activation_ranks(model, names, config, x, y, rank_table, seen, eps_ranks)
    # before converting anything (a model without a head is refused here); a converted layer's factors train
    set_trainable(model, all_names, config.train_rest, config.last_n, config.modules_to_save)
    layers = []
    for idx, name in enumerate(names):
        caps = seen[name].view[0] if name in act_eps and act_ranks[name][0] >= seen[name].view[0] else None
        layers.append(_replace(model, name, config, act_ranks.get(name), act_eps.get(name), config.seed + idx,
                               seen[name], caps))
    return _finish(model, config, layers, fusing, table)


def rebuild(model: nn.Module, record: Mapping[str, Any]) -> InjectionSummary:
    """Re-create on `model` (a fresh, never-injected copy of the architecture) the structure `record` describes
    (`InjectionSummary.to_config()`): the same layer types, K, activation ranks, seeds, fused MLPs and blocks, and
    what trains. No calibration data is needed; the factors are placeholders until a state_dict of the injected
    model is loaded (strict=True works). ValueError when `record` is not such a record or does not fit `model`."""
    if not isinstance(record, Mapping) or record.get("format") != _FORMAT:
        raise ValueError(f"not a WASI injection record (expected format={_FORMAT!r}, from "
                         "InjectionSummary.to_config())")
    if record.get("version") != _VERSION:
        raise ValueError(f"injection record version {record.get('version')!r} is not supported (expected {_VERSION})")
    known = {f.name for f in fields(WASIConfig)}
    config = WASIConfig(**{k: v for k, v in record["config"].items() if k in known})
    layers = [LayerSummary(**entry) for entry in record["layers"]]
    for info in layers:
        module = model.get_submodule(info.name) if _has(model, info.name) else None
        adapter = None if module is None else adapter_for(module)
        if adapter is None or adapter.name != info.base:
            raise ValueError(f"the record converts {info.name} ({info.base}), which this model does not have as "
                             f"such a layer; rebuild onto a fresh copy of the architecture it was taken from")
    # the converted layers are the last_n blocks' targets already, so they stand for every target here
    set_trainable(model, [l.name for l in layers], config.train_rest, config.last_n, config.modules_to_save)
    for info in layers:
        replace_module(model, info.name, _empty_layer(info, config, model.get_submodule(info.name)))
    blocks = find_blocks(model)
    fusing = [Mlp(n, _form(model, n), enclosing(blocks, n) or "") for n in record.get("fused_mlps", [])]
    return _finish(model, config, layers, fusing, None, grid_blocks=record.get("grid_blocks", []),
                   checkpoint=bool(record.get("checkpointed_blocks")),
                   attention=bool(record.get("checkpointed_attention")))


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _form(model: nn.Module, name: str) -> MlpForm:
    form = form_of(model.get_submodule(name))
    if form is None:
        raise ValueError(f"the record fuses the MLP {name}, which this model does not have")
    return form


def _empty_layer(info: LayerSummary, config: WASIConfig, module: nn.Module) -> ASILinear | WSILinear:
    """A subspace layer of `info`'s kind and shapes whose values a state_dict will replace (zeros; the dense base
    weight for ASI and the dense-weight updates, so an un-loaded layer still computes something sensible)."""
    weight = adapter_for(module).weight(module).detach()  # type: ignore[union-attr]
    bias = None if not info.bias else torch.zeros(info.out_features, dtype=weight.dtype, device=weight.device)
    if info.kind == "ASILinear":
        assert info.act_ranks is not None
        layer: ASILinear | WSILinear = ASILinear(weight.clone(), bias, info.act_ranks, info.seed)
    else:
        k = info.weight_rank
        assert k is not None
        L = weight.new_zeros(info.out_features, k)
        R = weight.new_zeros(k, info.in_features)
        dense = weight.clone() if config.weight_update != "factored" else None
        if info.kind == "WASILinear":
            assert info.act_ranks is not None
            layer = WASILinear(L, R, bias, info.act_ranks, config.weight_update, info.seed, config.epsilon, dense)
        else:
            layer = WSILinear(L, R, bias, config.weight_update, config.epsilon, dense)
    _label(layer, info)
    return layer


def _label(layer: ASILinear | WSILinear, info: LayerSummary) -> None:
    """Set what `info` records about a subspace layer beyond its shapes."""
    layer.base, layer.grid_from_block, layer.batch_rank_cap = info.base, info.grid, info.batch_rank_cap


def _replace(model: nn.Module, name: str, config: WASIConfig, act_ranks: list[int] | None, act_eps: float | None,
             seed: int, seen: Seen, batch_rank_cap: int | None) -> LayerSummary:
    module = model.get_submodule(name)
    adapter = adapter_for(module)
    assert adapter is not None  # find_targets returns base layers only
    linear = adapter.as_linear(module)
    new = _convert(linear, config, act_ranks, seed)
    o, i = linear.out_features, linear.in_features
    b = 0 if linear.bias is None else o
    k = getattr(new, "rank", None)
    info = LayerSummary(name=name, kind=type(new).__name__, in_features=i, out_features=o, weight_rank=k,
                        act_ranks=act_ranks, act_epsilon=act_eps, params_before=o * i + b,
                        params_after=(o * i if k is None else k * (o + i)) + b, base=adapter.name,
                        bias=linear.bias is not None, input_shape=list(seen.view), grid=seen.grid, seed=seed,
                        batch_rank_cap=batch_rank_cap)
    _label(new, info)
    replace_module(model, name, new)
    return info


def _finish(model: nn.Module, config: WASIConfig, layers: list[LayerSummary], fusing: Sequence[Mlp],
            table: RankTable | None, grid_blocks: Sequence[str] | None = None,
            checkpoint: bool | None = None, attention: bool | None = None) -> InjectionSummary:
    """What inject and rebuild share once the layers are converted: grid hooks, recompute, summary. checkpoint,
    attention: whether to checkpoint the blocks / attention modules (None: as config's recompute mode says)."""
    trains = trained_modules(model)
    blocks = find_blocks(model)
    if grid_blocks is None:
        grid_blocks = sorted({b for l in layers if l.grid and (b := enclosing(blocks, l.name)) is not None})
    for block in grid_blocks:
        track_token_grid(model.get_submodule(block))
    for mlp in fusing:
        fuse(model.get_submodule(mlp.name), mlp.form)
    mode = config.recompute_mode
    attended = checkpoint_attention(model) if (mode == "attn" if attention is None else attention) else []
    checkpointed = checkpoint_blocks(model) if (mode == "block" if checkpoint is None else checkpoint) else []
    fused = [m.name for m in fusing]
    summary = InjectionSummary(layers=layers, rank_table=table, recompute=mode,
                               recomputed=fused + attended + checkpointed,
                               trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                               total_params=sum(p.numel() for p in model.parameters()), trains=trains,
                               fused_mlps=fused, checkpointed_blocks=checkpointed, checkpointed_attention=attended,
                               grid_blocks=list(grid_blocks), config=config)
    _logger.info("injected %d layers (%s): %d trainable / %d parameters; recompute=%s on %d modules", len(layers),
                 ", ".join(f"{l.name} K={l.weight_rank} r={l.act_ranks}" for l in layers),
                 summary.trainable_params, summary.total_params, mode, len(summary.recomputed))
    return summary


def _refuse_bypassed(names: list[str], seen: dict[str, Seen], config: WASIConfig) -> None:
    """A target that never ran would be listed as converted while its parent uses the weight some other way."""
    bypassed = [n for n in names if seen[n].calls == 0]
    if not bypassed:
        return
    hint = " or targets='mlp'" if config.target_modules is None and config.targets == "mlp+attn" else ""
    listed = f"{bypassed[:4]}{' …' if len(bypassed) > 4 else ''}"
    raise ValueError(f"targets {listed} never ran on the calibration batch: the module holding each reads its weight "
                     "itself (e.g. F.linear(x, self.qkv.weight)) instead of calling it, so a converted layer would be "
                     f"bypassed; leave them out with target_modules=[...]{hint}")


def _check_fixed_ranks(names: list[str], ranks: list[int], seen: dict[str, Seen]) -> None:
    """Fixed ranks need one entry per compressed mode, the same count for every target."""
    modes: dict[int, list[str]] = {}
    for n in names:
        modes.setdefault(len(seen[n].view), []).append(n)
    if len(modes) > 1:
        said = "; ".join(f"{k} modes: {v[0]}" + (f" and {len(v) - 1} more" if len(v) > 1 else "")
                         for k, v in sorted(modes.items()))
        raise ValueError(f"ranks={ranks} cannot fit these targets, which compress inputs of different mode counts "
                         f"({said}); use epsilon_act (or budget_bytes) instead of ranks, or fewer targets")
    count = next(iter(modes))
    if len(ranks) != count:
        example = seen[names[0]].view
        layout = " as its block's (B, H, W, C) map" if seen[names[0]].grid else ""
        raise ValueError(f"ranks={ranks} has {len(ranks)} entries but the targets compress {count}-mode inputs "
                         f"(e.g. {names[0]}: {tuple(example)}{layout}): give {count} ranks, one per mode, e.g. "
                         f"ranks={[8] * count}")


def _plan_fusion(model: nn.Module, candidates: list[Mlp], computes: dict[str, bool], strict: bool,
                 mode: str) -> list[Mlp]:
    """The MLPs to fuse; with recompute='mlp' set explicitly (strict) one the fused path cannot take is refused,
    otherwise left unfused and named in a warning ("mlp" by default, "attn") or an info line ("block")."""
    plan, skipped = [], []
    for mlp in candidates:
        module = model.get_submodule(mlp.name)
        problem: str | None
        if mlp.form.fusable and not computes.get(mlp.name, False):
            problem = f"its forward does not compute {mlp.form.formula()} (checked on the calibration batch)"
        else:
            problem = mlp.form.problem(module)
        if problem is None:
            plan.append(mlp)
        elif strict:
            raise ValueError(f"recompute='mlp' cannot fuse the MLP {mlp.name} ({type(module).__name__}, "
                             f"{mlp.form.label}): {problem}; set recompute='none' or recompute='block'")
        else:
            skipped.append(f"{mlp.name} ({problem})")
    if skipped:
        log = _logger.warning if mode in ("mlp", "attn") else _logger.info
        log("recompute=%s leaves %d MLPs unfused, so they save their hidden activations%s: %s", mode, len(skipped),
            "" if mode == "block" else " (recompute='block' recomputes them too)", "; ".join(skipped[:3]) +
            (" …" if len(skipped) > 3 else ""))
    return plan


def _convert(linear: nn.Linear, config: WASIConfig, act_ranks: list[int] | None, seed: int) -> ASILinear | WSILinear:
    if not config.activation:
        return WSILinear.from_linear(linear, config.epsilon, config.weight_update)
    assert act_ranks is not None
    if not config.weight:
        return ASILinear.from_linear(linear, act_ranks, seed)
    return WASILinear.from_linear(linear, config.epsilon, act_ranks, config.weight_update, seed)


def _activation_ranks(model: nn.Module, names: list[str], config: WASIConfig, x: Inputs, y: Tensor | None,
                      rank_table: RankTable | None, seen: dict[str, Seen], eps_ranks: dict[str, list[int]]
                      ) -> tuple[dict[str, list[int]], dict[str, float], RankTable | None]:
    """Per-layer activation ranks and their ε, from exactly one of config.ranks / epsilon_act / budget_bytes."""
    if not config.activation:
        return {}, {}, None
    if config.ranks is not None:
        return {n: list(config.ranks) for n in names}, {}, None
    if config.epsilon_act is not None:
        return eps_ranks, {n: config.epsilon_act for n in names}, None
    table = rank_table
    if table is None:
        if y is None:
            raise ValueError("budget_bytes without a rank_table needs labels: pass calibration=(x, y) to inject, "
                             "or a saved rank_table")
        table = build_rank_table(model, names, x, y, config.eps_set)
    if sorted(table.layers) != sorted(names):
        raise ValueError(f"rank_table covers layers {table.layers} but the targets are {names}; "
                         "rebuild it for this model, targets and last_n")
    stale = [n for n, rows in zip(table.layers, table.ranks) if any(len(r) != len(seen[n].view) for r in rows)]
    if stale:
        raise ValueError(f"rank_table ranks of {stale[:3]} do not have one entry per compressed mode (Swin MLP inputs "
                         "are compressed as (B, H, W, C)); rebuild the table with build_rank_table")
    assert config.budget_bytes is not None  # WASIConfig checks that exactly one rank source is set
    assignment = solve_budget(table, config.budget_bytes)
    return ranks_for(table, assignment), assignment, table
