"""WASIConfig: what `inject` converts and how (docs/method.md, Variants and which layers train)."""
from __future__ import annotations

from dataclasses import dataclass

from wasi.layers import WEIGHT_UPDATES

__all__ = ["RECOMPUTE", "TARGETS", "WASIConfig"]

TARGETS = ("mlp", "mlp+attn")
RECOMPUTE = ("none", "mlp", "attn", "block")  # from least to most recomputed


@dataclass
class WASIConfig:
    """Configuration of the subspace method.

    weight: low-rank weight L R (WSI); activation: Tucker-compressed saved input (ASI); both: WASI.
    epsilon: weight explained-variance threshold in (0, 1] giving each layer's rank K.
    Activation ranks (when activation=True) come from at most one of the following set explicitly;
    with none of them set, epsilon_act = epsilon:
      epsilon_act: per-layer truncated-HOSVD ranks of the calibration batch's layer inputs;
      ranks: fixed ranks, one per compressed input mode in order, clipped at run time to what each mode
        can hold: 3 for ViT tokens (B, N, C) and attention inputs, 4 for Swin MLP inputs, compressed as
        (B, H, W, C); a model needing both (Swin with targets="mlp+attn") takes epsilon_act or budget_bytes;
      budget_bytes: per-layer ε from eps_set chosen by the perplexity knapsack (wasi.ranks).
    targets: "mlp" (blocks' mlp.fc1/fc2) or "mlp+attn" (also attn.qkv/attn.proj).
    last_n: convert and train only the last n target layers (None: all).
    train_rest: False: only the converted layers and the classifier head train; True: as the authors' scripts,
      everything else trains too (densely), except, with last_n set, the parameters before the first converted
      layer (wasi.set_trainable).
    weight_update: "factored" (no dense weight ever), "reference" (dense W = L R, one subspace-iteration
      step per optimizer step) or "svd" (the paper's "SVD every iteration" ablation: full dense W, a
      fresh truncated SVD at ε every step, so K may change).
    recompute: what a training step recomputes in backward instead of saving (docs/method.md, Whole-step
      recompute; exact either way):
      "none": nothing; every op saves what autograd saves (GELU its (…, 4D) input, attention q, k, v, output
        and log-sum-exp, LayerNorm its input);
      "mlp": each MLP whose fc1 and fc2 are converted becomes a wasi.RecomputeMlp that saves fc1's low-rank
        x Rᵀ (…, K) instead of anything of the hidden width (…, 4D) (needs weight=True);
      "attn": every block's attention module saves only its input and recomputes q, k, v and the attention in
        backward (wasi.checkpoint_attention), so nothing of (B, heads, N, d) is held; with weight=True the MLPs are
        also RecomputeMlp, as "mlp";
      "block": every transformer block saves only its input (wasi.checkpoint_blocks), recomputing the rest; with
        weight=True its MLPs are also RecomputeMlp (where the MLP has no dropout), so a block recomputed in
        backward holds nothing of the hidden width either.
      Default (None): "mlp" when weight=True, else "none".
    seed: seeds each layer's Gaussian Tucker initialisation (layer i uses seed + i).
    """

    weight: bool = True
    activation: bool = True
    epsilon: float = 0.8
    epsilon_act: float | None = None
    ranks: list[int] | None = None
    budget_bytes: int | None = None
    eps_set: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    targets: str = "mlp"
    last_n: int | None = None
    train_rest: bool = False
    weight_update: str = "factored"
    recompute: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ranks is not None:
            self.ranks = [int(r) for r in self.ranks]
        self.eps_set = tuple(float(e) for e in self.eps_set)
        if self.recompute is None:
            self.recompute = "mlp" if self.weight else "none"
        _check(self)
        if self.activation and self.ranks is None and self.budget_bytes is None and self.epsilon_act is None:
            self.epsilon_act = self.epsilon


def _in_unit(value: float) -> bool:
    return 0.0 < value <= 1.0


def _check(c: WASIConfig) -> None:
    if not (c.weight or c.activation):
        raise ValueError("weight=False and activation=False leaves nothing to do; "
                         "set method.weight=true and/or method.activation=true (or use method=vanilla)")
    if not _in_unit(c.epsilon):
        raise ValueError(f"epsilon must be in (0, 1], got {c.epsilon}; set method.epsilon=0.8")
    sources = {k: v for k, v in (("epsilon_act", c.epsilon_act), ("ranks", c.ranks),
                                 ("budget_bytes", c.budget_bytes)) if v is not None}
    if len(sources) > 1:
        raise ValueError(f"activation ranks come from one of epsilon_act, ranks, budget_bytes, got {sorted(sources)}; "
                         "keep one and set the others to null")
    if not c.activation and sources:
        raise ValueError(f"{sorted(sources)} only apply when activation=True; set method.activation=true "
                         "or set them to null")
    if c.epsilon_act is not None and not _in_unit(c.epsilon_act):
        raise ValueError(f"epsilon_act must be in (0, 1], got {c.epsilon_act}; set method.epsilon_act=0.8")
    if c.ranks is not None and (not c.ranks or min(c.ranks) < 1):
        raise ValueError(f"ranks must be positive ints, one per input mode, got {c.ranks}; "
                         "set e.g. method.ranks=[8,16,32]")
    if c.budget_bytes is not None and c.budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be positive, got {c.budget_bytes}; set e.g. method.budget_bytes=1000000")
    if not c.eps_set or not all(_in_unit(e) for e in c.eps_set):
        raise ValueError(f"eps_set must be non-empty with values in (0, 1], got {c.eps_set}; "
                         "set method.eps_set=[0.4,0.5,0.6,0.7,0.8,0.9]")
    if c.targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {c.targets!r}; set method.targets=mlp")
    if c.last_n is not None and c.last_n < 1:
        raise ValueError(f"last_n must be a positive int or null, got {c.last_n}; "
                         "set method.last_n=null for all layers")
    if c.recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {c.recompute!r}; set method.recompute=none")
    if c.recompute == "mlp" and not c.weight:
        raise ValueError("recompute='mlp' recomputes fc1's output from the low-rank x Rᵀ, which weight=False (ASI) "
                         "does not have; set method.recompute=none or method.recompute=block (or attn)")
    if c.weight_update not in WEIGHT_UPDATES:
        raise ValueError(f"weight_update must be one of {WEIGHT_UPDATES}, got {c.weight_update!r}; "
                         "set method.weight_update=factored")
