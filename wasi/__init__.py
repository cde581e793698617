"""WASI: Weight-Activation Subspace Iteration for low-rank fine-tuning of vision transformers.

PEFT-like use: `summary = inject(model, WASIConfig(...), calibration=(x, y))`, then train with
`SubspaceSGD(model, lr)` (and `clip_grad_norm_(model, max_norm)` if clipping).
"""
from wasi.config import WASIConfig
from wasi.layers import ASILinear, WASILinear, WSILinear
from wasi.model import InjectionSummary, LayerSummary, factored_layers, find_targets, inject
from wasi.optim import SubspaceSGD, clip_grad_norm_
from wasi.ranks import InfeasibleBudgetError, RankTable, build_rank_table, solve_budget
from wasi.subspace import explained_variance_rank, orth, subspace_iteration, truncated_hosvd, tucker, tucker_reconstruct

__all__ = ["WASIConfig", "inject", "find_targets", "factored_layers", "InjectionSummary", "LayerSummary",
           "ASILinear", "WSILinear", "WASILinear", "SubspaceSGD", "clip_grad_norm_",
           "orth", "subspace_iteration", "tucker", "truncated_hosvd", "tucker_reconstruct",
           "explained_variance_rank", "build_rank_table", "solve_budget", "RankTable", "InfeasibleBudgetError"]
