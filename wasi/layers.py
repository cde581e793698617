"""Subspace linear layers: ASI (dense weight, Tucker-compressed saved input), WSI (low-rank weight
L R, dense saved input) and WASI (both).

Inputs are (…, I) with any number of leading modes, compressed as they come: tokens (B, N, I), channels-last
maps (B, H, W, C), or (T, I). A Swin MLP's (B, H·W, C) input is compressed as (B, H, W, C) once its block's
pre-hook (`track_token_grid`) has set the layer's `token_grid` = (H, W). At inference (eval mode, or no
grad needed) the layers run plain `F.linear` ops, so tracers such as fvcore see ordinary linears.
"""
from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wasi.adapters import adapter_named
from wasi.blocks import block_grid, first_tensor, grid_view
from wasi.config import WEIGHT_UPDATES
from wasi.functional import SubspaceLinearFn, compute_dtype, factored_carriers
from wasi.guard import register_factors
from wasi.recompute import active_record
from wasi.subspace import explained_variance_rank, last_mode_warm_start, svd, tucker, tucker_ranks

__all__ = ["WEIGHT_UPDATES", "ASILinear", "WASILinear", "WSILinear", "low_rank_factors", "track_token_grid",
           "untrack_token_grid"]

_logger = logging.getLogger(__name__)
_batch_warned: set[tuple[int, int]] = set()


def low_rank_factors(weight: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """Truncated SVD `W ≈ L R` keeping the smallest rank K that explains a fraction epsilon of Σσ².

    weight: (O, I) -> L = U_K: (O, K) with orthonormal columns, R = Σ_K V_Kᵀ: (K, I).
    """
    u, s, vh = svd(weight)
    k = explained_variance_rank(s, epsilon)
    return u[:, :k].to(weight.dtype).contiguous(), (s[:k, None] * vh[:k]).to(weight.dtype).contiguous()


def _check_ranks(act_ranks: Sequence[int]) -> list[int]:
    ranks = [int(r) for r in act_ranks]
    if not ranks or min(ranks) < 1:
        raise ValueError(f"act_ranks must be positive ints, one per input mode, got {list(act_ranks)}")
    return ranks


def _full_weight(linear: nn.Linear, weight_update: str) -> Tensor | None:
    """The untruncated dense weight (O, I) that "svd" mode keeps; None (L R) for the other modes."""
    return linear.weight.detach().clone() if weight_update == "svd" else None


def _nbytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class _SubspaceLinear(nn.Module, ABC):
    """Shared training/inference dispatch, Tucker warm start and memory report.

    Subclasses set `weight` or `L`/`R`, and `bias`, and say how the weight enters SubspaceLinearFn.
    `act_ranks` None means the input is saved dense; otherwise it is Tucker-compressed with those
    per-mode ranks (clipped at run time as `wasi.subspace.tucker_ranks` says). `token_grid` (H, W), set by
    the enclosing Swin block's pre-hook when `grid_from_block` is true, makes a (B, H·W, C) input compress as
    (B, H, W, C). `base`: the layer type it replaced ("Linear", "Conv1D"; wasi.adapters), which `wasi.merge`
    restores. `batch_rank_cap`: the size of mode 0 of the calibration input when its activation rank kept all of
    it (ranks from epsilon_act or a budget); a larger training input then logs a warning once (`note_batch`).
    """

    bias: Tensor | None
    _seed: Tensor
    is_subspace_layer = True

    def __init__(self, in_features: int, out_features: int, act_ranks: Sequence[int] | None, seed: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.act_ranks = None if act_ranks is None else _check_ranks(act_ranks)
        # the Tucker initialisation's seed as a tensor, so compiled code takes it as an input, not a constant
        self.register_buffer("_seed", torch.tensor(seed, dtype=torch.int64), persistent=False)
        self.token_grid: tuple[int, int] | None = None
        self.grid_from_block = False
        self.base = "Linear"
        self.batch_rank_cap: int | None = None
        self._factors: list[Tensor] | None = None  # previous step's Tucker factors (warm start), not in state_dict
        self._act_bytes: tuple[int, int] | None = None  # (saved, dense) activation bytes of the last training forward

    def forward(self, x: Tensor) -> Tensor:
        """x: (…, I) -> (…, O); in the autocast dtype under autocast."""
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if not (self.training and needs_grad):
            return self._inference(x)
        self.note_batch(x)
        x = x.to(compute_dtype(x))
        core, factors = self._compress(x)
        weight, L, R = self._fn_weights()
        return SubspaceLinearFn.apply(x, weight, L, R, self.bias, *self._carriers(x.shape, x), core, *factors)

    def factored_rank(self, shape: Sequence[int]) -> int:
        """r of the factored ∇W = G Pᵀ for an input of `shape` (…, I): the Tucker rank of the feature mode of the
        compressed input (`tucker_ranks` of its (B, H, W, C) view under a token grid), or the number of tokens
        ∏ shape[:-1] when x is saved dense."""
        if self.act_ranks is None:
            return math.prod(shape[:-1])
        return tucker_ranks(self._compressed_shape(shape), self.act_ranks)[-1]

    def _compressed_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape the Tucker step sees for an input of `shape` (…, I): (B, H, W, I) under a token grid."""
        return tuple(shape) if self.token_grid is None else (shape[0], *self.token_grid, shape[-1])

    def _compress(self, x: Tensor) -> tuple[Tensor | None, list[Tensor]]:
        """What the backward keeps of the input x: (…, I): (None, []) when x is saved dense, else the Tucker core
        and factors of x (viewed as (B, H, W, C) under a token grid), by one warm-started subspace-iteration step.
        Inside a checkpointed block's recomputation (wasi.recompute) the first forward's are replayed instead."""
        replayed = self._replayed()
        if replayed is not None:
            return replayed
        core, factors = self._tucker(x)
        self._remember(x.numel() * x.element_size(), core, factors)
        return core, factors

    def _replayed(self) -> tuple[Tensor | None, list[Tensor]] | None:
        """Inside a checkpointed block's recomputation, the compression its first forward recorded; else None."""
        record = active_record()
        if self.act_ranks is None or record is None or not record[1]:
            return None
        return record[0].take(self)

    def feature_warm_start(self, shape: Sequence[int]) -> Tensor | None:
        """U^prev: (I, r) of the feature mode when the next Tucker step of an input of `shape` (…, I) takes that
        mode as two products (`wasi.subspace.last_mode_warm_start`); x U^prev may then be passed to `_tucker`."""
        if self.act_ranks is None:
            return None
        return last_mode_warm_start(self._compressed_shape(shape), self.act_ranks, self._factors)

    def _tucker(self, x: Tensor, last: Tensor | None = None) -> tuple[Tensor | None, list[Tensor]]:
        """The Tucker step of `_compress` with no side effect (it reads the warm start, changes nothing), so it may
        run inside an autograd Function's forward under torch.compile; (None, []) when x is saved dense. `last`:
        x U^prev (…, r) for the U^prev that `feature_warm_start` gave, taken by the caller in its own pass over x."""
        if self.act_ranks is None:
            return None, []
        xt = grid_view(x, self.token_grid)
        if len(self.act_ranks) != xt.dim():
            layout = "(B, H, W, C): a Swin MLP input" if self.token_grid is not None else f"{xt.dim()}-mode"
            raise ValueError(f"act_ranks={self.act_ranks} has {len(self.act_ranks)} entries but this layer compresses "
                             f"its input of shape {tuple(xt.shape)} as {layout}; give one rank per mode "
                             f"({xt.dim()} ranks), e.g. ranks={[8] * xt.dim()}, or use epsilon_act")
        with torch.no_grad():
            last = None if last is None else grid_view(last, self.token_grid).detach()
            return tucker(xt.detach(), self.act_ranks, self._factors, seed=self._seed, last=last)

    def _remember(self, input_bytes: int, core: Tensor | None, factors: list[Tensor]) -> None:
        """The side effects of `_compress`: the next step's warm start, the memory report of this forward (its
        input took `input_bytes`) and, in a checkpointed block's first forward, the record for its recomputation."""
        if core is None:
            self._act_bytes = (input_bytes, input_bytes)
            return
        self._factors = factors
        self._act_bytes = (_nbytes(core, *factors), input_bytes)
        record = active_record()
        if record is not None:
            record[0].put(self, (core, factors))

    @property
    def seed(self) -> int:
        """Seed of the Gaussian Tucker initialisation (`wasi.subspace.seeded_normal`, stream m for mode m)."""
        return int(self._seed)

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed.fill_(value)

    def note_batch(self, x: Tensor) -> None:
        """Warn once per (calibration, training) size pair when a training input x: (n_0, …) has a larger mode 0
        than the calibration input whose activation rank kept all n_0 of its directions: the rank, an absolute
        number, then keeps a smaller share of this input than epsilon_act asked for."""
        cap = self.batch_rank_cap
        if cap is None or x.dim() < 2 or x.shape[0] <= cap or (cap, x.shape[0]) in _batch_warned:
            return
        _batch_warned.add((cap, x.shape[0]))
        _logger.warning("a training input with mode 0 of size %d is larger than the calibration batch's (%d), whose "
                        "activation rank kept all %d directions: that rank stays %d, below what epsilon_act would "
                        "keep of this input; calibrate on a batch as large as the training batch", x.shape[0], cap,
                        cap, cap)

    def warm_start_state(self) -> list[Tensor]:
        """The Tucker factors [U_m: (n_m, r_m)] the next training forward warm-starts from ([] before the
        first one, or when the input is saved dense). Not in the state_dict (they belong to the training
        trajectory, not to the weights): a training checkpoint saves them to resume exactly."""
        return [] if self._factors is None else list(self._factors)

    def load_warm_start_state(self, factors: Sequence[Tensor]) -> None:
        """Restore `warm_start_state()`; [] means a fresh seeded Gaussian start at the next forward."""
        self._factors = [f.detach().clone() for f in factors] or None

    def memory_report(self) -> dict[str, int]:
        """Paper's count for this layer, from the last training forward: bytes of the saved activation
        (S + Σ U_m, or x when saved dense) and of the weight representation plus bias (L + R + b, or
        W + b), next to the dense layer's (x, and W + b)."""
        if self._act_bytes is None:
            raise RuntimeError("memory_report() needs one training forward first (model.train(), grad enabled)")
        weights = self._paper_weights()
        assert weights[0] is not None
        dense_weight = self.out_features * self.in_features + (0 if self.bias is None else self.out_features)
        return {"activation_bytes": self._act_bytes[0], "weight_bytes": _nbytes(*weights),
                "dense_activation_bytes": self._act_bytes[1],
                "dense_weight_bytes": dense_weight * weights[0].element_size()}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, act_ranks={self.act_ranks}"

    @abstractmethod
    def _fn_weights(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(weight, L, R) as SubspaceLinearFn takes them."""

    @abstractmethod
    def _carriers(self, shape: Sequence[int], like: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The (r, O) and (r, I) carriers (`functional.factored_carriers`, in like's dtype and device) of a factored ∇W
        for an input of `shape`, set up to hand their gradients to the layer; (None, None) when the layer takes a
        dense ∇W or none."""

    @abstractmethod
    def _inference(self, x: Tensor) -> Tensor:
        """The eval-mode forward, x: (…, I) -> (…, O)."""

    @abstractmethod
    def _paper_weights(self) -> tuple[Tensor | None, ...]:
        """The weight representation the paper counts: W or L first, the bias (or None) last."""


class ASILinear(_SubspaceLinear):
    """Dense weight; the saved input is a Tucker decomposition (core S and factors U_m, never x).

    weight: (O, I), bias: (O,) or None. act_ranks: one rank per compressed input mode (3 for (B, N, I), 4 for a
    Swin MLP's (B, H, W, C)). state_dict: `weight`, `bias` (as nn.Linear). Gradients are ordinary dense `.grad`s.
    """

    weight: Tensor

    def __init__(self, weight: Tensor, bias: Tensor | None, act_ranks: Sequence[int], seed: int = 0):
        super().__init__(weight.shape[1], weight.shape[0], act_ranks, seed)
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_ranks: Sequence[int], seed: int = 0) -> ASILinear:
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.weight.detach().clone(), bias, act_ranks, seed)

    def _fn_weights(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self.weight, None, None

    def _carriers(self, shape: Sequence[int], like: Tensor) -> tuple[None, None]:
        return None, None

    def _inference(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def _paper_weights(self) -> tuple[Tensor | None, ...]:
        return self.weight, self.bias


class WSILinear(_SubspaceLinear):
    """Low-rank weight W = L R (y = (x Rᵀ) Lᵀ + b); the input is saved dense.

    L: (O, K) with orthonormal columns, R: (K, I), bias: (O,) or None.
    weight_update="factored" (default): `L`, `R`, `bias` are the parameters and the whole state_dict;
      backward leaves `L.grad`/`R.grad` empty and stores ∇W = G Pᵀ as `factored_grad = (G: (O, r),
      P: (I, r))`, which SubspaceSGD turns into new factors without any (O, I) tensor. With the dense
      saved input, G = dy_(unfold)ᵀ and P = x_(unfold)ᵀ (r = number of tokens, P not orthonormal);
      WASI has P = U_d. Successive backwards concatenate along r; SubspaceSGD.zero_grad clears it.
      Under torch.distributed, `factored_grad_reduced` says whether it is already the mean over ranks
      (wasi.distributed.reduce_factored_grads; each backward resets it).
    weight_update="reference": the method's update with a materialised dense weight (docs/method.md,
      Weight subspace (WSI)): a dense parameter `weight` (O, I) = L R receives the dense gradient; `L`, `R`
      are buffers that SubspaceSGD re-derives after each step by one subspace-iteration step,
      L' = orth(W' W'ᵀ L), R' = L'ᵀ W', and W is projected to L' R'. This is not the published code's
      step, which pairs L' with R = L_oldᵀ W' and never projects W (docs/method.md, Differences from the
      published code). state_dict: `weight`, `bias`, `L`, `R`.
    weight_update="svd" (the paper's "SVD every iteration" ablation): the dense parameter `weight` (O, I)
      is the full weight (`from_linear`: the untruncated W), takes the plain SGD step and is never
      projected; `L`, `R` are buffers re-derived from it after each step by a fresh truncated SVD at
      `epsilon`, so K is recomputed each step and may change (the buffers are replaced; a state_dict
      loads into a layer of the same K). Projecting W back to L R, as "reference" does, would make K
      shrink every step: ε of an already truncated spectrum needs fewer directions. Needs `epsilon`.
      state_dict: `weight`, `bias`, `L`, `R`.
    """

    factored_grad: tuple[Tensor, Tensor] | None
    L: Tensor
    R: Tensor
    weight: Tensor  # "reference"/"svd" only

    def __init__(self, L: Tensor, R: Tensor, bias: Tensor | None, weight_update: str = "factored",
                 epsilon: float | None = None, weight: Tensor | None = None):
        """weight: the dense (O, I) parameter of the "reference"/"svd" modes (default L R)."""
        super().__init__(R.shape[1], L.shape[0], None, 0)
        if weight_update not in WEIGHT_UPDATES:
            raise ValueError(f"weight_update must be one of {WEIGHT_UPDATES}, got {weight_update!r}")
        if weight_update == "svd" and epsilon is None:
            raise ValueError("weight_update='svd' re-derives K from epsilon each step: "
                             "pass epsilon (or use from_linear)")
        self.weight_update, self.epsilon = weight_update, epsilon
        if weight_update == "factored":
            self.L, self.R = nn.Parameter(L), nn.Parameter(R)
        else:
            self.weight = nn.Parameter(L @ R if weight is None else weight)
            self.register_buffer("L", L)
            self.register_buffer("R", R)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.factored_grad = None
        self.factored_grad_reduced = False  # averaged over data-parallel ranks yet (wasi.distributed)
        self.factored_grad_stale = False  # an optimizer step used it: the next backward starts a new one
        self._ready_carriers: tuple[Tensor, Tensor] | None = None  # for the next training forward (`_carriers`)
        self._register_factors()

    def _register_factors(self) -> None:
        """Only wasi.SubspaceSGD may step this layer (wasi.guard)."""
        if self.weight_update == "factored":
            register_factors(self.L, self.R)
        else:
            register_factors(self.weight)

    def __setstate__(self, state: dict[str, Any]) -> None:  # deep copies and unpickled layers are guarded too
        super().__setstate__(state)
        self._register_factors()

    @classmethod
    def from_linear(cls, linear: nn.Linear, epsilon: float, weight_update: str = "factored") -> WSILinear:
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(*low_rank_factors(linear.weight, epsilon), bias, weight_update, epsilon,
                   _full_weight(linear, weight_update))

    @property
    def rank(self) -> int:
        return self.L.shape[1]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Also loads a dense layer's state (a `weight` (O, I), as nn.Linear or the `base` type stores it, and no
        L, R): factored, its rank-K truncated SVD gives L, R; otherwise it is the dense weight and L, R its rank-K
        factors. So a plain checkpoint loads into an injected model with strict=True, and is not ignored."""
        key = prefix + "weight"
        if key in state_dict and prefix + "L" not in state_dict and prefix + "R" not in state_dict:
            dense = adapter_named(self.base).stored_weight(state_dict[key])
            if dense.shape != (self.out_features, self.in_features):
                raise ValueError(f"{key} has shape {tuple(dense.shape)}, but this layer maps {self.in_features} to "
                                 f"{self.out_features} features")
            u, s, vh = svd(dense)
            k = self.rank
            state_dict[prefix + "L"], state_dict[prefix + "R"] = u[:, :k], s[:k, None] * vh[:k]
            if self.weight_update == "factored":
                del state_dict[key]
        if self.weight_update == "svd":  # K may have changed since this layer was built: take the saved one
            for name in ("L", "R"):
                saved = state_dict.get(prefix + name)
                if isinstance(saved, Tensor) and saved.shape != getattr(self, name).shape:
                    self.register_buffer(name, torch.empty_like(saved, device=self.L.device))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave out the carriers made ready for the next forward: their hooks deliver to this
        layer, so a copy makes its own at its first forward."""
        state = super().__getstate__()
        return {**state, "_ready_carriers": None}

    def accumulate_factored_grad(self, g: Tensor, p: Tensor) -> None:
        """Add ∇W += g pᵀ. g: (O, r), p: (I, r); successive backwards concatenate along r, until an optimizer step
        uses the sum (`factored_grad_stale`) or `zero_grad` clears it (so a loop that clears only `.grad`s, as
        transformers.Trainer's `model.zero_grad()`, does not add old gradients). Each training forward's backward
        calls it once, as soon as autograd has put Gᵀ and Pᵀ on that forward's carriers."""
        self.factored_grad_reduced = False
        if self.factored_grad is None or self.factored_grad_stale:
            self.factored_grad_stale = False
            self.factored_grad = (g, p)
        else:
            g0, p0 = self.factored_grad
            self.factored_grad = (torch.cat([g0, g], 1), torch.cat([p0, p], 1))

    def _fn_weights(self) -> tuple[Tensor | None, Tensor, Tensor]:
        return (None if self.weight_update == "factored" else self.weight), self.L, self.R

    def _carriers(self, shape: Sequence[int], like: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Each training forward gets its own pair, so several forwards before one backward keep their (G, P) apart.
        The pair a backward's delivery made ready for the next forward is taken when it fits: then no tensor is
        created, and no hook registered, inside the forward (what torch.compile cannot trace mid-graph)."""
        if self.weight_update != "factored" or not (self.L.requires_grad or self.R.requires_grad):
            return None, None
        r, ready = self.factored_rank(shape), self._ready_carriers
        record = active_record()
        if record is not None and record[1]:  # a checkpointed block's recomputation: its graph is never backwarded
            return factored_carriers(r, self.out_features, self.in_features, like)
        self._ready_carriers = None
        if ready is not None and ready[0].shape == (r, self.out_features) and ready[0].dtype == like.dtype \
                and ready[0].device == like.device:
            return ready
        return self._new_carriers(r, like)

    def _new_carriers(self, r: int, like: Tensor) -> tuple[Tensor, Tensor]:
        g, p = factored_carriers(r, self.out_features, self.in_features, like)
        deliver = _Delivery(self, g, p)
        g.register_post_accumulate_grad_hook(deliver)
        p.register_post_accumulate_grad_hook(deliver)
        return g, p

    def _inference(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.R), self.L, self.bias)

    def _paper_weights(self) -> tuple[Tensor | None, ...]:
        return self.L, self.R, self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, weight_update={self.weight_update}"


class WASILinear(WSILinear):
    """Low-rank weight W = L R (as WSILinear, same parameters and state_dict) and a Tucker-compressed
    saved input (as ASILinear): backward sees only S and the U_m, and ∇W = G U_dᵀ has rank ≤ r_d."""

    def __init__(self, L: Tensor, R: Tensor, bias: Tensor | None, act_ranks: Sequence[int],
                 weight_update: str = "factored", seed: int = 0, epsilon: float | None = None,
                 weight: Tensor | None = None):
        super().__init__(L, R, bias, weight_update, epsilon, weight)
        self.act_ranks = _check_ranks(act_ranks)
        self.seed = seed

    @classmethod
    def from_linear(  # type: ignore[override]  # act_ranks is required here
            cls, linear: nn.Linear, epsilon: float, act_ranks: Sequence[int],
                    weight_update: str = "factored", seed: int = 0) -> WASILinear:
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(*low_rank_factors(linear.weight, epsilon), bias, act_ranks, weight_update, seed, epsilon,
                   _full_weight(linear, weight_update))


class _Delivery:
    """Post-accumulate-grad hook of one training forward's two carriers: once autograd has put Gᵀ and Pᵀ on both,
    hands ∇W = G Pᵀ to the layer and clears them (so a second backward through the same graph adds its own)."""

    def __init__(self, layer: WSILinear, g: Tensor, p: Tensor):
        self.layer, self.g, self.p = layer, g, p

    def __call__(self, _: Tensor) -> None:
        gt, pt = self.g.grad, self.p.grad
        if gt is not None and pt is not None:
            self.g.grad = self.p.grad = None
            self.layer.accumulate_factored_grad(gt.T, pt.T)
            self.layer._ready_carriers = self.layer._new_carriers(gt.shape[0], gt)  # for the next forward


def _set_token_grid(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: the subspace layers in `block` with `grid_from_block` learn (H, W) of a (B, H, W, C) block
    input, else None."""
    grid = block_grid(first_tensor(args, kwargs))
    for m in block.modules():
        if isinstance(m, _SubspaceLinear) and m.grid_from_block:
            m.token_grid = grid


def track_token_grid(block: nn.Module) -> None:
    """Register on a transformer block the pre-hook that keeps `token_grid` of its subspace layers with
    `grid_from_block` current (a Swin block's (B, H, W, C) input gives (H, W)). The hook is a module-level function
    that finds the layers from its block argument, so deep copies and pickles of the model carry a working hook.
    Idempotent."""
    if any(h is _set_token_grid for h in block._forward_pre_hooks.values()):
        return
    block.register_forward_pre_hook(_set_token_grid, with_kwargs=True)


def untrack_token_grid(block: nn.Module) -> None:
    """Remove the pre-hook of `track_token_grid` from `block`."""
    for key, hook in list(block._forward_pre_hooks.items()):
        if hook is _set_token_grid:
            del block._forward_pre_hooks[key]
            block._forward_pre_hooks_with_kwargs.pop(key, None)
