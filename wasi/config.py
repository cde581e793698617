"""WASIConfig: what `inject` converts and how (docs/method.md, Variants and which layers train).

Every option and its default is written here once. Fields whose values are choices have `Literal` types
(mypy checks callers); `WASIConfigError` carries the field, the value and a value that works, so a caller
with its own naming (a CLI, a Hydra schema) can phrase the error in its terms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

__all__ = ["EPS_SET", "RECOMPUTE", "TARGETS", "WEIGHT_UPDATES", "Recompute", "Targets", "WASIConfig",
           "WASIConfigError", "WeightUpdate"]

#: The explained-variance thresholds the paper sweeps, and the budget DP's default choices.
EPS_SET: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

Targets = Literal["mlp", "mlp+attn"]
Recompute = Literal["none", "mlp", "attn", "block"]  # from least to most recomputed
WeightUpdate = Literal["factored", "reference", "svd"]
TARGETS: tuple[str, ...] = get_args(Targets)
RECOMPUTE: tuple[str, ...] = get_args(Recompute)
WEIGHT_UPDATES: tuple[str, ...] = get_args(WeightUpdate)


class WASIConfigError(ValueError):
    """A WASIConfig field holds a value that cannot work.

    field: the field's name; value: what it holds; reason: why not ("must be in (0, 1]"); fix: values that
    would work, as {field: value} (one or more fields), or a sentence when no single value says it.
    The message reads `epsilon=1.5: must be in (0, 1]; set epsilon=0.8`.
    """

    def __init__(self, field: str, value: Any, reason: str, fix: dict[str, Any] | str):
        self.field, self.value, self.reason, self.fix = field, value, reason, fix
        remedy = fix if isinstance(fix, str) else "set " + " and ".join(f"{k}={v!r}" for k, v in fix.items())
        super().__init__(f"{field}={value!r}: {reason}; {remedy}")


@dataclass
class WASIConfig:
    """Configuration of the subspace method.

    weight: low-rank weight L R (WSI); activation: Tucker-compressed saved input (ASI); both: WASI.
    epsilon: weight explained-variance threshold in (0, 1] giving each layer's rank K.
    Activation ranks (when activation=True) come from at most one of the following set explicitly;
    with none of them set, epsilon_act = epsilon:
      epsilon_act: per-layer truncated-HOSVD ranks of the calibration batch's layer inputs;
      ranks: fixed ranks, one per mode of what each target compresses, clipped at run time to what each mode
        can hold: 3 for tokens (B, N, C), 4 for channels-last maps (B, H, W, C) (a Swin MLP's (B, H·W, C) input
        counts as its block's map), 2 for (N, C); all targets must compress the same number of modes;
      budget_bytes: per-layer ε from eps_set chosen by the perplexity knapsack (wasi.ranks).
    targets: a preset found from the model's structure under any prefix: "mlp" (every linear of each transformer
      block's MLP: fc1/fc2, gate/up/down, c_fc/c_proj, …) or "mlp+attn" (also the attention projections).
    target_modules: instead of `targets`, name the linears (nn.Linear or transformers' Conv1D), as PEFT does: a list
      of names, each matching a module whose qualified name equals it or ends with "." + it; a string, a regular
      expression the whole qualified name must match; or "all-linear", every linear except the output head.
    last_n: convert and train only the targets in the last n transformer blocks (a target outside every block counts
      as a block of its own; None: all). docs/method.md, Which layers: how blocks are found and counted.
    train_rest: False: only the converted layers, the classifier head and `modules_to_save` train; True: as the
      authors' scripts, everything else trains too (densely), except, with last_n set, the parameters before the
      first converted layer (wasi.set_trainable).
    modules_to_save: more modules that train densely, by name (exact or "."-suffix, as target_modules), like PEFT's
      option of that name. A model without a findable head needs it (an empty list says "nothing else").
    weight_update: "factored" (no dense weight ever), "reference" (dense W = L R, one subspace-iteration
      step per optimizer step) or "svd" (the paper's "SVD every iteration" ablation: full dense W, a
      fresh truncated SVD at ε every step, so K may change).
    recompute: what a training step recomputes in backward instead of saving (docs/method.md, Whole-step
      recompute; exact either way):
      "none": nothing; every op saves what autograd saves (GELU its (…, 4D) input, attention q, k, v, output
        and log-sum-exp, LayerNorm its input);
      "mlp": each MLP whose linears are all converted computes fc1's (or gate's and up's) low-rank x Rᵀ (…, K) and
        recomputes the hidden activation from it in backward, so nothing of the hidden width (…, 4D) is saved
        (needs weight=True); an MLP the fused path cannot take is refused by `inject`, naming it;
      "attn": every transformer block's attention module saves only its input and recomputes q, k, v and the
        attention in backward (wasi.checkpoint_attention), so nothing of (B, heads, N, d) is held; with weight=True
        the MLPs are also fused where they can be, as with "mlp" (one the fused path cannot take is left as it is,
        with a warning that names it);
      "block": every transformer block saves only its input (wasi.checkpoint_blocks), recomputing the rest; with
        weight=True its MLPs are also fused where they can be, so a block recomputed in backward holds nothing
        of the hidden width either.
      Default (None): "mlp" when weight=True, else "none"; by default an MLP the fused path cannot take is left
      as it is, with a warning that names it.
    seed: seeds each layer's Gaussian Tucker initialisation (layer i uses seed + i).
    """

    weight: bool = True
    activation: bool = True
    epsilon: float = 0.8
    epsilon_act: float | None = None
    ranks: list[int] | None = None
    budget_bytes: int | None = None
    eps_set: tuple[float, ...] = EPS_SET
    targets: Targets = "mlp"
    target_modules: list[str] | str | None = None
    last_n: int | None = None
    train_rest: bool = False
    modules_to_save: list[str] | None = None
    weight_update: WeightUpdate = "factored"
    recompute: Recompute | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ranks is not None:
            self.ranks = [int(r) for r in self.ranks]
        self.eps_set = tuple(float(e) for e in self.eps_set)
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            self.target_modules = [str(n) for n in self.target_modules]
        if self.modules_to_save is not None:
            self.modules_to_save = [str(n) for n in self.modules_to_save]
        _check(self)
        if self.activation and self.ranks is None and self.budget_bytes is None and self.epsilon_act is None:
            self.epsilon_act = self.epsilon

    @property
    def recompute_mode(self) -> Recompute:
        """The recompute mode in effect: `recompute`, or its default ("mlp" with low-rank weights, else "none")."""
        if self.recompute is not None:
            return self.recompute
        return "mlp" if self.weight else "none"


def _in_unit(value: float) -> bool:
    return 0.0 < value <= 1.0


def _check(c: WASIConfig) -> None:
    if not (c.weight or c.activation):
        raise WASIConfigError("weight", c.weight, "with activation=False too, nothing is compressed",
                              {"weight": True})
    if not _in_unit(c.epsilon):
        raise WASIConfigError("epsilon", c.epsilon, "must be in (0, 1]", {"epsilon": 0.8})
    sources = [k for k in ("epsilon_act", "ranks", "budget_bytes") if getattr(c, k) is not None]
    if len(sources) > 1:
        raise WASIConfigError(sources[1], getattr(c, sources[1]), f"{sources[0]} also chooses the activation ranks",
                              f"keep one of {sources} and set the others to None")
    if not c.activation and sources:
        raise WASIConfigError(sources[0], getattr(c, sources[0]), "activation ranks only apply when activation=True",
                              {sources[0]: None})
    if c.epsilon_act is not None and not _in_unit(c.epsilon_act):
        raise WASIConfigError("epsilon_act", c.epsilon_act, "must be in (0, 1]", {"epsilon_act": 0.8})
    if c.ranks is not None and (not c.ranks or min(c.ranks) < 1):
        raise WASIConfigError("ranks", c.ranks, "must be positive ints, one per compressed input mode",
                              {"ranks": [8, 16, 32]})
    if c.budget_bytes is not None and c.budget_bytes <= 0:
        raise WASIConfigError("budget_bytes", c.budget_bytes, "must be positive", {"budget_bytes": 1_000_000})
    if not c.eps_set or not all(_in_unit(e) for e in c.eps_set):
        raise WASIConfigError("eps_set", c.eps_set, "must be non-empty with values in (0, 1]", {"eps_set": EPS_SET})
    if c.targets not in TARGETS:
        raise WASIConfigError("targets", c.targets, f"must be one of {TARGETS}", {"targets": "mlp"})
    if isinstance(c.target_modules, list) and not c.target_modules:
        raise WASIConfigError("target_modules", c.target_modules, "names no module",
                              "name some, e.g. target_modules=['fc1', 'fc2'], or set it to None (targets decides)")
    if c.last_n is not None and c.last_n < 1:
        raise WASIConfigError("last_n", c.last_n, "must be a positive int or None", {"last_n": None})
    if c.recompute is not None and c.recompute not in RECOMPUTE:
        raise WASIConfigError("recompute", c.recompute, f"must be one of {RECOMPUTE} or None", {"recompute": None})
    if c.recompute == "mlp" and not c.weight:
        raise WASIConfigError("recompute", c.recompute, "recomputes fc1's output from the low-rank x Rᵀ, which "
                              "weight=False (ASI) does not have", "set recompute='none' or recompute='block'")
    if c.weight_update not in WEIGHT_UPDATES:
        raise WASIConfigError("weight_update", c.weight_update, f"must be one of {WEIGHT_UPDATES}",
                              {"weight_update": "factored"})
