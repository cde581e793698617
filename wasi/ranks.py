"""Activation ranks under a memory budget: the perplexity table and its knapsack DP.

For every target layer l and every explained-variance threshold ε in an ε set, one
calibration batch gives the truncated-HOSVD ranks r(l, ε) of the layer input, the bytes
m(l, ε) of the Tucker core plus factors, and the perplexity
p(l, ε) = ‖∇W_compressed − ∇W_exact‖_F. `solve_budget` then picks one ε per layer that
minimises Σ p subject to Σ m ≤ budget.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from wasi.adapters import adapter_for
from wasi.config import EPS_SET
from wasi.functional import tucker_weight_grad
from wasi.probe import Inputs, compression_views, logits_of, run_model
from wasi.subspace import truncated_hosvd

__all__ = ["InfeasibleBudgetError", "RankTable", "build_rank_table", "ranks_for", "solve_budget"]

_logger = logging.getLogger(__name__)

_FORMAT = "wasi.rank_table"
_VERSION = 1
_TARGET_BUCKETS = 2048


class InfeasibleBudgetError(ValueError):
    """The budget is below Σ_l min_ε m(l, ε). `min_feasible_bytes` holds that smallest budget."""

    def __init__(self, message: str, min_feasible_bytes: int):
        super().__init__(message)
        self.min_feasible_bytes = min_feasible_bytes


@dataclass
class RankTable:
    """Per-layer, per-ε activation ranks, memory and perplexity from one calibration batch.

    Indexing is `[layer][eps]`, following `layers` and `eps_set`:
    ranks: per-mode Tucker ranks (one int per mode of the layer input);
    memory_bytes: bytes of core + all factors at the activation's element size;
    perplexity: ‖∇W_compressed − ∇W_exact‖_F on the calibration batch.
    calibration_shape: shape of the model input batch; input_shapes: each layer's input shape.
    """

    eps_set: list[float]
    layers: list[str]
    ranks: list[list[list[int]]]
    memory_bytes: list[list[int]]
    perplexity: list[list[float]]
    calibration_shape: list[int]
    input_shapes: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _validate(self)
        self.eps_set = [float(e) for e in self.eps_set]

    def to_json(self) -> str:
        return json.dumps({"format": _FORMAT, "version": _VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, s: str) -> RankTable:
        """Parse and validate; raises ValueError naming what is wrong for a malformed or foreign file."""
        try:
            data = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"rank table is not valid JSON ({e}); regenerate it with build_rank_table") from e
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"not a WASI rank table (expected a JSON object with format={_FORMAT!r}); "
                             "regenerate it with build_rank_table")
        if data.get("version") != _VERSION:
            raise ValueError(f"rank table version {data.get('version')!r} is not supported (expected {_VERSION}); "
                             "regenerate it with build_rank_table")
        names = ("eps_set", "layers", "ranks", "memory_bytes", "perplexity", "calibration_shape", "input_shapes")
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"rank table is missing fields {missing}; regenerate it with build_rank_table")
        return cls(**{n: data[n] for n in names})

    def eps_index(self, eps: float) -> int:
        for i, e in enumerate(self.eps_set):
            if math.isclose(e, eps, rel_tol=0.0, abs_tol=1e-9):
                return i
        raise ValueError(f"ε={eps} is not in the table's eps_set {self.eps_set}")


def _validate(t: RankTable) -> None:
    def bad(msg: str) -> ValueError:
        return ValueError(f"malformed rank table: {msg}; regenerate it with build_rank_table")

    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(t.eps_set, (list, tuple)) or not all(isinstance(e, (int, float)) for e in t.eps_set):
        raise bad("eps_set must be a list of numbers")
    if not isinstance(t.layers, list) or not all(isinstance(v, list) for v in (t.calibration_shape, t.input_shapes)):
        raise bad("layers, calibration_shape and input_shapes must be lists")
    n_l, n_e = len(t.layers), len(t.eps_set)
    if n_e == 0 or not all(0.0 < e <= 1.0 for e in t.eps_set):
        raise bad(f"eps_set must be a non-empty list of values in (0, 1], got {t.eps_set}")
    if not all(isinstance(n, str) for n in t.layers) or len(set(t.layers)) != n_l:
        raise bad("layers must be distinct strings")
    for name, rows in (("ranks", t.ranks), ("memory_bytes", t.memory_bytes), ("perplexity", t.perplexity)):
        shaped = isinstance(rows, list) and len(rows) == n_l
        if not shaped or not all(isinstance(r, list) and len(r) == n_e for r in rows):
            raise bad(f"{name} must be a {n_l}×{n_e} nested list (layers × eps_set)")
    if not all(isinstance(r, list) and r and all(is_int(v) and v > 0 for v in r) for row in t.ranks for r in row):
        raise bad("ranks must be non-empty lists of positive ints")
    if not all(is_int(m) and m >= 0 for row in t.memory_bytes for m in row):
        raise bad("memory_bytes must be non-negative ints")
    if not all(isinstance(p, (int, float)) and math.isfinite(p) and p >= 0 for row in t.perplexity for p in row):
        raise bad("perplexity must be finite non-negative numbers")
    if not all(is_int(v) and v > 0 for v in t.calibration_shape):
        raise bad("calibration_shape must be a list of positive ints")
    if t.input_shapes and (len(t.input_shapes) != n_l or not all(
            isinstance(s, list) and all(is_int(v) and v > 0 for v in s) for s in t.input_shapes)):
        raise bad(f"input_shapes must hold one list of positive ints per layer ({n_l})")


def build_rank_table(model: nn.Module, target_names: Sequence[str], x: Inputs, y: torch.Tensor,
                     eps_set: Sequence[float] = EPS_SET,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy) -> RankTable:
    """One forward + backward of the dense model on the calibration batch (x, y), then the table.

    x: the model's input, a tensor or a mapping of keyword inputs (Hugging Face); the loss is
    loss_fn(logits, y) (wasi.probe.logits_of). target_names: qualified names of base linear layers (nn.Linear,
    Conv1D), each called once per forward. Each layer's input is taken as the converted layer would compress it:
    Swin MLP inputs (B, H·W, C) as (B, H, W, C) (wasi.probe.compression_views), so their ranks have 4 entries.
    The pass runs in eval mode (no dropout, no BatchNorm statistics update); the model's modes and `requires_grad`
    flags are restored, no hooks are left behind, and gradients are taken with `torch.autograd.grad`, so no
    parameter `.grad` is written.
    Perplexity uses the compressed contraction (docs/method.md, Compressed gradients) in float32;
    ∇W_exact = dy_(unfold)ᵀ x_(unfold). Memory uses the activation's element size.
    """
    modules = dict(model.named_modules())
    missing = [n for n in target_names if n not in modules or adapter_for(modules[n]) is None]
    if missing:
        raise ValueError(f"targets {missing} are not linear layers (nn.Linear, Conv1D) of the model; "
                         "pass names from find_targets(model)")
    targets = [modules[n] for n in target_names]
    xs: dict[str, torch.Tensor] = {}
    dys: dict[str, torch.Tensor] = {}

    def capture(name: str, view: Callable[[str, torch.Tensor], torch.Tensor]) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name in xs:
                raise ValueError(f"target {name} is called more than once per forward; "
                                 "rank tables need one call per layer")
            xs[name] = view(name, inputs[0].detach())
            output.register_hook(lambda g: dys.__setitem__(name, g.detach()))
        return hook

    modes = {m: m.training for m in model.modules()}
    flags = [(m.weight, m.weight.requires_grad) for m in targets]
    with compression_views(model, target_names) as view:
        handles = [m.register_forward_hook(capture(n, view)) for n, m in zip(target_names, targets)]
        try:
            model.eval()
            for w, _ in flags:
                w.requires_grad_(True)
            with torch.enable_grad():
                loss = loss_fn(logits_of(run_model(model, x)), y)
                not_called = [n for n in target_names if n not in xs]
                if not_called:
                    raise ValueError(f"targets {not_called} were not called in the forward pass; "
                                     "pass names from find_targets(model)")
                torch.autograd.grad(loss, [m.weight for m in targets])
        finally:
            for h in handles:
                h.remove()
            for w, req in flags:
                w.requires_grad_(req)
            for m, training in modes.items():
                m.train(training)

    ranks, memory, perplexity, shapes = [], [], [], []
    for name in target_names:
        a, dy = xs[name], dys[name]
        dy = dy.reshape(*a.shape[:-1], dy.shape[-1])  # to a's modes, e.g. (B, H, W, O)
        exact = dy.reshape(-1, dy.shape[-1]).float().T @ a.reshape(-1, a.shape[-1]).float()
        r_row, m_row, p_row = [], [], []
        for eps in eps_set:
            core, factors = truncated_hosvd(a, eps)
            g, p = tucker_weight_grad(dy.float(), core.float(), [u.float() for u in factors])
            approx = g @ p.T
            r_row.append([int(u.shape[1]) for u in factors])
            m_row.append((core.numel() + sum(u.numel() for u in factors)) * a.element_size())
            p_row.append(float(torch.linalg.matrix_norm(approx - exact)))
        ranks.append(r_row)
        memory.append(m_row)
        perplexity.append(p_row)
        shapes.append(list(a.shape))
        _logger.debug("rank table %s: ranks %s, bytes %s, perplexity %s", name, r_row, m_row, p_row)
    return RankTable(eps_set=list(eps_set), layers=list(target_names), ranks=ranks, memory_bytes=memory,
                     perplexity=perplexity, calibration_shape=list(_first_tensor_shape(x)),
                     input_shapes=shapes)


def _first_tensor_shape(x: Inputs) -> torch.Size:
    """Shape of the model input (a mapping's first tensor, e.g. `input_ids`)."""
    if isinstance(x, torch.Tensor):
        return x.shape
    return next(v for v in x.values() if isinstance(v, torch.Tensor)).shape


def solve_budget(table: RankTable, budget_bytes: int, granularity_bytes: int | None = None) -> dict[str, float]:
    """Choose one ε per layer minimising Σ p(l, ε) subject to Σ m(l, ε) ≤ budget_bytes.

    Knapsack DP over memory above the per-layer minimum, discretised to `granularity_bytes`.
    Each layer's extra memory m(l, ε) − min_ε m(l, ε) is rounded UP to whole buckets, so the
    returned assignment truly fits the budget; the price is that it is optimal only among
    assignments whose rounded memory fits, which includes every assignment using at most
    budget − n_layers·granularity bytes. Default granularity: ceil(C / 2048) bytes, where C is the
    usable extra memory min(budget − Σ_l min m, Σ_l (max m − min m)), giving about 2048 buckets;
    granularity 1 makes the DP exact. Ties go to the later entry of eps_set.
    When the budget affords every layer its own lowest-perplexity ε (the unconstrained optimum), that
    assignment is returned as is, whatever the granularity.
    Raises InfeasibleBudgetError when budget_bytes < Σ_l min_ε m(l, ε) (that sum is feasible).
    """
    base = [min(row) for row in table.memory_bytes]
    min_total = sum(base)
    if budget_bytes < min_total:
        raise InfeasibleBudgetError(
            f"activation budget {budget_bytes} bytes ({budget_bytes / 2**20:.3f} MiB) is infeasible for "
            f"{len(table.layers)} layers and eps_set {table.eps_set}: the smallest feasible budget is "
            f"{min_total} bytes ({min_total / 2**20:.3f} MiB). Fix: set budget_bytes >= {min_total}, add smaller "
            "values to eps_set, or compress fewer layers (targets / last_n).", min_total)
    if granularity_bytes is not None and granularity_bytes < 1:
        raise ValueError(f"granularity_bytes must be a positive int, got {granularity_bytes}")
    best_own = [_lowest(row) for row in table.perplexity]
    if sum(table.memory_bytes[l][i] for l, i in enumerate(best_own)) <= budget_bytes:
        return _assignment(table, best_own, budget_bytes, granularity_bytes)
    extra = [[m - b for m in row] for row, b in zip(table.memory_bytes, base)]
    usable = min(budget_bytes - min_total, sum(max(row) for row in extra))
    if granularity_bytes is None:
        granularity_bytes = max(1, math.ceil(usable / _TARGET_BUCKETS))
    buckets = [[-(-e // granularity_bytes) for e in row] for row in extra]  # rounded up
    cap = min((budget_bytes - min_total) // granularity_bytes, sum(max(row) for row in buckets))
    inf = float("inf")
    best = [0.0] * (cap + 1)  # best[c]: min Σ p of the layers so far using ≤ c buckets
    choices: list[list[int]] = []
    for row_p, weights in zip(table.perplexity, buckets):
        new, pick = [inf] * (cap + 1), [-1] * (cap + 1)
        for i in reversed(range(len(row_p))):
            w, p = weights[i], row_p[i]
            for c in range(w, cap + 1):
                v = best[c - w] + p
                if v < new[c]:
                    new[c], pick[c] = v, i
        best = new
        choices.append(pick)
    chosen, c = [], cap
    for pick, weights in zip(reversed(choices), reversed(buckets)):
        i = pick[c]
        chosen.append(i)
        c -= weights[i]
    chosen.reverse()
    return _assignment(table, chosen, budget_bytes, granularity_bytes)


def _lowest(row: Sequence[float]) -> int:
    """Index of the smallest value; ties go to the later index."""
    best = min(row)
    return max(i for i, v in enumerate(row) if v == best)


def _assignment(table: RankTable, chosen: list[int], budget_bytes: int, granularity_bytes: int | None
                ) -> dict[str, float]:
    _logger.info("budget %d bytes (granularity %s): Σ perplexity %.4g, Σ memory %d bytes", budget_bytes,
                 granularity_bytes, sum(table.perplexity[l][i] for l, i in enumerate(chosen)),
                 sum(table.memory_bytes[l][i] for l, i in enumerate(chosen)))
    return {name: table.eps_set[i] for name, i in zip(table.layers, chosen)}


def ranks_for(table: RankTable, assignment: dict[str, float]) -> dict[str, list[int]]:
    """Per-mode activation ranks of each layer under an ε assignment (e.g. from solve_budget)."""
    unknown = set(assignment) - set(table.layers)
    if unknown:
        raise ValueError(f"layers {sorted(unknown)} are not in the rank table (layers: {table.layers})")
    return {name: table.ranks[table.layers.index(name)][table.eps_index(eps)] for name, eps in assignment.items()}
