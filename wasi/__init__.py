"""WASI: Weight-Activation Subspace Iteration for low-rank fine-tuning of vision transformers.

PEFT-like use: `summary = inject(model, WASIConfig(...), calibration=(x, y))`, then train with
`SubspaceSGD(model, lr)` (and `clip_grad_norm_(model, max_norm)` if clipping). Other methods of a suite
share `set_trainable` (which parameters train), `checkpoint_blocks` and `checkpoint_attention` (recompute).
"""
from wasi.config import WASIConfig
from wasi.layers import ASILinear, WASILinear, WSILinear
from wasi.mlp import RecomputeMlp
from wasi.model import InjectionSummary, LayerSummary, factored_layers, find_targets, inject
from wasi.optim import SubspaceSGD, clip_grad_norm_
from wasi.ranks import InfeasibleBudgetError, RankTable, build_rank_table, solve_budget
from wasi.recompute import checkpoint_attention, checkpoint_blocks
from wasi.subspace import explained_variance_rank, orth, subspace_iteration, truncated_hosvd, tucker, tucker_reconstruct
from wasi.trainable import set_trainable

__all__ = ["ASILinear", "InfeasibleBudgetError", "InjectionSummary", "LayerSummary", "RankTable", "RecomputeMlp",
           "SubspaceSGD", "WASIConfig", "WASILinear", "WSILinear", "build_rank_table", "checkpoint_attention",
           "checkpoint_blocks",
           "clip_grad_norm_", "explained_variance_rank", "factored_layers", "find_targets", "inject", "orth",
           "set_trainable", "solve_budget", "subspace_iteration", "truncated_hosvd", "tucker", "tucker_reconstruct"]
