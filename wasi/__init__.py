"""WASI: Weight-Activation Subspace Iteration for low-rank fine-tuning of transformers.

PEFT-like use: `summary = inject(model, WASIConfig(...), calibration=(x, y))`, then train with
`SubspaceSGD(model, lr)` (and `clip_grad_norm_(model, max_norm)` if clipping); `merge(model)` gives the plain
architecture back, `rebuild(model, summary.to_config())` the injected one without data. Other methods of a suite
share `find_targets` (what converts), `set_trainable` (which parameters train), `checkpoint_blocks` and
`checkpoint_attention` (block and attention recompute).
"""
from wasi.adapters import replace_module
from wasi.blocks import find_blocks
from wasi.config import EPS_SET, WASIConfig, WASIConfigError
from wasi.layers import ASILinear, WASILinear, WSILinear
from wasi.merge import merge
from wasi.mlp import MLP_FORMS
from wasi.model import InjectionSummary, LayerSummary, factored_layers, find_targets, inject, rebuild
from wasi.optim import SubspaceSGD, clip_grad_norm_
from wasi.ranks import InfeasibleBudgetError, RankTable, build_rank_table, solve_budget
from wasi.recompute import checkpoint_attention, checkpoint_blocks
from wasi.subspace import explained_variance_rank, orth, subspace_iteration, truncated_hosvd, tucker, tucker_reconstruct
from wasi.targets import find_head, tuned_targets
from wasi.trainable import set_trainable

__all__ = ["EPS_SET", "MLP_FORMS", "ASILinear", "InfeasibleBudgetError", "InjectionSummary", "LayerSummary",
           "RankTable", "SubspaceSGD", "WASIConfig", "WASIConfigError", "WASILinear", "WSILinear", "build_rank_table",
           "checkpoint_attention", "checkpoint_blocks", "clip_grad_norm_", "explained_variance_rank",
           "factored_layers", "find_blocks", "find_head", "find_targets", "inject", "merge", "orth", "rebuild",
           "replace_module", "set_trainable", "solve_budget", "subspace_iteration", "truncated_hosvd", "tucker",
           "tucker_reconstruct", "tuned_targets"]
