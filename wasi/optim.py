"""SGD for models with subspace layers, and gradient clipping by the true global norm."""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from wasi.distributed import reduce_factored_grads
from wasi.functional import factor_product
from wasi.layers import WSILinear, low_rank_factors
from wasi.model import factored_layers
from wasi.subspace import orth

__all__ = ["BASES", "Basis", "SubspaceSGD", "clip_grad_norm_", "factored_sq_norm", "keeps_row_gram",
           "next_row_gram", "reorthonormalise", "subspace_step", "takes_nearest_basis"]

#: The orthonormal basis of span(W'Q) a factored step takes as L' (the weights W = L R are the same either way):
#: "qr" the Q factor of QR(W'Q), as docs/method.md defines orth; "nearest" the one closest to L (`_nearest_step`)
Basis = Literal["qr", "nearest"]
BASES: tuple[str, ...] = get_args(Basis)

CHOLESKY_MIN_PIVOT = 1e-5  # smallest T_ii / largest T_ii (about 1/κ(W'Q)) for the float64 Cholesky-QR, whose
# orthogonality error grows as ε₆₄ κ²: up to about 1e-6 here; below it, Householder QR
ORTH_TOL = 1e-5  # largest |‖L[:, j]‖² − 1| the Cholesky-QR steps may accumulate before L is re-orthonormalised
NEAREST_MIN_PIVOT = 3e-3  # smallest / largest pivot of the float32 Cholesky factor of B₁ in the nearest basis
# (κ(B₁) ≤ about 1e5, as the Cholesky-QR's bound on κ(W'Q)); below it, the QR basis
DRIFT_CHECK_EVERY = 16  # Cholesky-QR or nearest-basis steps of a layer between two checks of its column norms
ROW_GRAM_REFRESH_EVERY = 16  # steps of a layer between two exact recomputations of the R Rᵀ it keeps


def keeps_row_gram(k: int, i: int) -> bool:
    """Whether a momentum-free layer with R: (K, I) keeps R Rᵀ from step to step: carrying it over,
    H' = M H Mᵀ + low-rank terms, costs two K×K×K products against K×I×K for R Rᵀ afresh."""
    return 4 * k <= i


def takes_nearest_basis(k: int, r: int) -> bool:
    """Whether a layer with rank K and factored gradient rank r takes the nearest basis under basis="nearest": its
    products cost about 4r(O+I)K multiply-adds against (K + 2r)(O+I)K for the QR basis."""
    return 4 * r <= k


def factored_sq_norm(g: Tensor, p: Tensor) -> Tensor:
    """‖G Pᵀ‖_F² in float32 for any P (orthonormal or not). g: (O, r), p: (I, r).

    Uses trace((GᵀG)(PᵀP)) when r(O+I) ≤ OI, else row blocks of G Pᵀ; either way the temporary
    is never larger than G. With orthonormal P this equals ‖G‖_F².
    """
    g, p = g.float(), p.float()
    (o, r), i = g.shape, p.shape[0]
    if r * (o + i) <= o * i:
        return ((g.T @ g) * (p.T @ p)).sum()
    return sum((block @ p.T).square().sum() for block in g.split(max(1, o * r // i)))


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> Tensor:
    """Scale all gradients of `model` so their global L2 norm is at most max_norm; returns the norm
    before clipping (as torch.nn.utils.clip_grad_norm_ with norm_type=2).

    The norm covers every parameter `.grad` and, for WSI/WASI layers, ‖∇W‖_F = ‖G Pᵀ‖_F of their
    `factored_grad`, whose G is scaled too (out of place: G may share memory with autograd buffers).
    Under torch.distributed the factored grads are first averaged over ranks (wasi.distributed), as
    DDP averages `.grad`, so every rank clips by the same global norm.
    """
    reduce_factored_grads([layer for _, layer in factored_layers(model)])
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    factored = [(layer, layer.factored_grad) for _, layer in factored_layers(model) if layer.factored_grad is not None]
    squares = [g.float().square().sum() for g in grads] + [factored_sq_norm(*gp) for _, gp in factored]
    if not squares:
        return torch.tensor(0.0)
    device = squares[0].device
    total = torch.stack([s.to(device) for s in squares]).sum().sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g))
    for layer, (g, p) in factored:
        layer.factored_grad = (g * scale.to(g), p)
    return total


class SubspaceSGD(torch.optim.Optimizer):
    """SGD (torch.optim.SGD semantics: weight decay added to the gradient, momentum without
    dampening) for ordinary parameters, and the factored update of docs/method.md, Factored update,
    for WSI/WASI layers.

    Param groups: one group of ordinary trainable parameters (when there are any), then one group
    [L, R] per factored-mode WSI/WASI layer; all take `lr`, `weight_decay`, `momentum`, so LR
    schedulers apply to every group.

    Factored layer (weight_update="factored"), with η = lr, λ = weight_decay, μ = momentum and the
    layer's factored_grad ∇W = G Pᵀ, the step takes W' = L A − η G Pᵀ, A = (1-ηλ) R − ημ C, to
        Q  = Aᵀ − η P (Gᵀ L)                    (I, K)
        L' = orth(L (A Q) − η G (Pᵀ Q))         (O, K)
        R' = (L'ᵀ L) A − η (L'ᵀ G) Pᵀ           (K, I)
    without any (O, I) tensor. Momentum: C (K, I), stored as state["momentum_buffer"] of R (zero
    before the first step), is the SGD momentum buffer D = ∇W + λ L R + μ L C projected onto the new
    column space: C ← L'ᵀ D. It equals SGD momentum on the dense weight when span(L') holds the dense
    buffer at every step (e.g. K = O); otherwise the part of the momentum outside the weight
    subspace is dropped. With μ = 0 these are the formulas of docs/method.md, Factored update, verbatim.
    `subspace_step` takes orth by a Cholesky-QR in the coordinates of [L, G] (two (O, K)-sized products in
    all; Householder QR when that is ill-conditioned or r > K), and every DRIFT_CHECK_EVERY such steps
    `reorthonormalise` restores LᵀL = I if rounding has moved it by more than ORTH_TOL. Without momentum, a layer
    with `keeps_row_gram` keeps R Rᵀ as state["row_gram"] of R and carries it to the next step (`next_row_gram`)
    instead of forming it, afresh every ROW_GRAM_REFRESH_EVERY steps and after R changed outside the optimizer.

    basis: which orthonormal basis of span(W'Q) becomes L' (`Basis`); W' = L'R' is the same in exact arithmetic, and
    so is every later step, which depends on span(L) only. "qr" (default): the Q factor of QR(W'Q), as above and
    as docs/method.md defines orth. "nearest": in a layer with `takes_nearest_basis` (gradient rank r at most K/4),
    the basis of that span closest to L, which differs from L by a rank-r update. L (and R, without momentum) is
    updated in place in O(K r (O + I)) multiply-adds, without the (O, K)×(K, K) and (K, K)×(K, I) products of the
    QR basis, and every momentum-free layer keeps R Rᵀ, whose carry then costs O(K² r) (`_nearest_step`;
    docs/method.md, The nearest basis). Its L drifts from orthonormal as the Cholesky-QR's does, and takes the
    same checks.

    Dense-weight layers (weight_update="reference" or "svd"): the dense `weight` takes the plain SGD
    step W' = (1-ηλ) W − η ∇W (dense momentum buffer included), then "reference": Q = W'ᵀ L,
    L' = orth(W' Q), R' = L'ᵀ W', W ← L' R'; "svd": L' = U_K, R' = Σ_K V_Kᵀ from a fresh truncated
    SVD W' = U Σ Vᵀ with K recomputed from the layer's ε (it may change between steps), W kept as W'.
    `zero_grad` also clears the layers' factored_grad, and a step marks each one it used as stale, so the next
    backward starts a new one even when a loop clears only `.grad`s (transformers.Trainer calls
    `model.zero_grad()`). Under torch.distributed (DDP averaging the ordinary `.grad`s), `step` first averages
    the factored grads over ranks exactly (wasi.distributed: an all_gather along r), so every rank takes the
    identical subspace step.

    max_grad_norm: when set, `step` first clips every gradient of `model`, factored ones included, to this global
    norm (`clip_grad_norm_`): for loops that clip with torch's `clip_grad_norm_`, which cannot see factored
    gradients (with transformers.Trainer: `TrainingArguments(max_grad_norm=0)` and this instead).
    Any other torch optimizer given the factors is refused at its first step (wasi.guard).
    """

    steps_factored_layers = True  # wasi.guard lets this optimizer step WSI/WASI layers

    def __init__(self, model: nn.Module, lr: float, weight_decay: float = 0.0, momentum: float = 0.0,
                 max_grad_norm: float | None = None, basis: Basis = "qr"):
        if lr < 0 or weight_decay < 0 or momentum < 0:
            raise ValueError(f"lr, weight_decay, momentum must be >= 0, got {lr}, {weight_decay}, {momentum}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        if basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {basis!r}: basis='qr' (the method's) or 'nearest'")
        self.max_grad_norm, self.basis = max_grad_norm, basis
        self._model = model
        layers = [layer for _, layer in factored_layers(model)]
        self._factored = [l for l in layers if l.weight_update == "factored" and l.L.requires_grad]
        self._reference = [l for l in layers if l.weight_update != "factored"]  # dense-weight modes
        factors = {id(t) for l in self._factored for t in (l.L, l.R)}
        plain = [p for p in model.parameters() if p.requires_grad and id(p) not in factors]
        groups = ([{"params": plain}] if plain else []) + [
            {"params": [l.L, l.R], "layer": i} for i, l in enumerate(self._factored)]
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "layer": None})
        self._row_gram_versions: dict[Tensor, int] = {}  # R -> its version counter when its row_gram was kept

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.max_grad_norm is not None:
            clip_grad_norm_(self._model, self.max_grad_norm)
        reduce_factored_grads(self._factored)
        for group in self.param_groups:
            if group["layer"] is None:
                self._sgd(group)
            else:
                self._factored_step(self._factored[group["layer"]], group)
        for layer in self._reference:
            if layer.weight.grad is not None:
                _resync(layer)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for layer in self._factored:
            layer.factored_grad = None

    def _sgd(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            d = p.grad.add(p, alpha=wd) if wd else p.grad
            if mu:
                buf = self.state[p].get("momentum_buffer")
                d = self.state[p]["momentum_buffer"] = d.clone() if buf is None else buf.mul_(mu).add_(d)
            p.add_(d, alpha=-lr)

    @record_function("wasi.factored_update")
    def _factored_step(self, layer: WSILinear, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        L, R = layer.L, layer.R
        if layer.factored_grad is None:
            if L.grad is not None or R.grad is not None:
                raise RuntimeError("a factored WSI/WASI layer got dense L/R grads but no factored_grad: run the "
                                   "training forward in train mode (model.train()) so the layer's own backward runs")
            return
        work = torch.promote_types(L.dtype, torch.float32)
        l0, r0 = L.to(work), R.to(work)
        g, p = (t.to(work) for t in layer.factored_grad)
        state = self.state[R]
        c = state.get("momentum_buffer")
        # A = alpha · a: without a momentum buffer, R scaled by 1 − ηλ inside the products (no (K, I) temporary)
        a, alpha = (r0, 1 - lr * wd) if c is None else ((1 - lr * wd) * r0 - lr * mu * c, 1.0)
        nearest = self.basis == "nearest" and takes_nearest_basis(L.shape[1], g.shape[1])
        keep = c is None and mu == 0 and R.dtype == work and (nearest or keeps_row_gram(*R.shape))  # then a = R
        gram = self._row_gram(R, r0, group) if keep else None
        step = (_nearest_step if nearest else _subspace_step)(l0, a, g, p, lr, alpha, gram)  # nearest: L in place
        buf = None
        if mu:  # C <- L'ᵀ D, D = ∇W + λ L R + μ L C
            buf = step.ltl_times(wd * r0 if c is None else wd * r0 + mu * c)
            buf.addmm_(step.ltg, p.T)
        state.pop("row_gram", None)
        if gram is not None and step.ap is not None and step.ptp is not None:
            state["row_gram"] = step.next_row_gram(gram, alpha, lr)
        new_r = step.new_r(a, alpha, p, lr)  # nearest: in place on a
        if step.drifts and self._drift_check_due(group):
            before = new_r
            new_l, new_r, buf = reorthonormalise(step.L, new_r, buf)
            if new_r is not before:  # R ← T R: the carried R Rᵀ no longer holds
                state.pop("row_gram", None)
        else:
            new_l = step.L
        if buf is not None:
            state["momentum_buffer"] = buf
        _store(R, new_r)
        _store(L, new_l)
        if "row_gram" in state:
            self._row_gram_versions[R] = R._version
        layer.factored_grad_stale = True

    def _row_gram(self, R: Tensor, r0: Tensor, group: dict) -> Tensor:
        """R Rᵀ: (K, K) for the step of R (r0: R in the working dtype). The one the last step kept (`row_gram` in
        R's optimizer state), or formed afresh: every ROW_GRAM_REFRESH_EVERY-th step of the layer (rounding
        accumulates in the kept one; the count is kept in its param group, so a resumed run refreshes at the
        same steps), when none is kept, and when R has changed since the step that kept it (its version counter
        moved: an in-place edit, a `load_state_dict` of the model after the optimizer's)."""
        n = group.get("row_gram_steps", 0)
        group["row_gram_steps"] = (n + 1) % ROW_GRAM_REFRESH_EVERY
        kept = self.state[R].get("row_gram")
        if kept is None or n == 0 or self._row_gram_versions.get(R) != R._version:
            return factor_product(r0, r0)
        return kept

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, and the kept R Rᵀ of each layer is taken to belong to its R as it is now: load the model's
        weights first (as experiments.training.checkpoint does); R changed after this is caught by its version."""
        super().load_state_dict(state_dict)
        self._row_gram_versions = {l.R: l.R._version for l in self._factored if "row_gram" in self.state[l.R]}

    @staticmethod
    def _drift_check_due(group: dict) -> bool:
        """True every DRIFT_CHECK_EVERY-th step of the layer of `group` whose L' can drift (a Cholesky-QR or the
        nearest basis). The count since the last check is kept in the layer's param group (`cholesky_steps`), so a
        run resumed from `state_dict()` checks at the same steps."""
        n = group.get("cholesky_steps", 0) + 1
        group["cholesky_steps"] = n % DRIFT_CHECK_EVERY
        return n == DRIFT_CHECK_EVERY


def _store(param: Tensor, value: Tensor) -> None:
    """param <- value, a fresh result of the step. On the CPU param takes value's storage (`set_`): copying the
    (O, K) and (K, I) factors into the old storage cost about 10% of ViT-B/32's optimizer step at K = 246 on a
    2-core CPU (docs/results.md, Which GEMM). Elsewhere it is copied in place, as torch's optimizers update: CUDA
    graphs (torch.compile's mode="reduce-overhead") assume parameters keep their addresses, and a parameter in shared
    memory (`model.share_memory()`, for training from several processes) must stay there."""
    if value is param:  # updated in place
        return
    value = value.to(param.dtype)
    if param.device.type == "cpu" and not param.is_shared():
        param.set_(value.untyped_storage(), value.storage_offset(), value.shape, value.stride())
    else:
        param.copy_(value)


class _Step(NamedTuple):
    """One layer's subspace step: L' and what R', the momentum buffer and the kept R Rᵀ are formed from."""
    L: Tensor  # L' (O, K)
    ltl: Tensor | None  # L'ᵀL (K, K); None in the nearest basis, where it is I − V diag(d) Vᵀ
    ltg: Tensor  # L'ᵀG (K, r)
    drifts: bool  # L' came from a Cholesky-QR or the nearest basis: its orthonormality drifts with rounding
    ap: Tensor | None  # A P (K, r), when the step formed it (r ≤ K)
    ptp: Tensor | None  # Pᵀ P (r, r), likewise
    v: Tensor | None = None  # nearest basis: V (K, r), orthonormal columns
    d: Tensor | None = None  # nearest basis: d (r,), 1 − cos of the angles L turned by, in [0, 1)

    def ltl_times(self, x: Tensor) -> Tensor:
        """L'ᵀL x for x: (K, n)."""
        if self.v is None or self.d is None:
            assert self.ltl is not None
            return self.ltl @ x
        return torch.addmm(x, self.v, (self.v.T @ x) * -self.d[:, None])

    def new_r(self, a: Tensor, alpha: float, p: Tensor, lr: float) -> Tensor:
        """R' = α L'ᵀL A − η L'ᵀG Pᵀ: (K, I) for a = A (K, I), p = P (I, r). Nearest basis: in place on a, one
        pass over it (one product of inner size 2r)."""
        if self.v is None or self.d is None:
            assert self.ltl is not None
            new_r = (alpha * self.ltl) @ a  # (K, K) @ (K, I) through MKL: oneDNN, given a transposed factor, was slower
            return new_r.addmm_(self.ltg, p.T, alpha=-lr)
        turned = (self.v.T @ a) * (-alpha * self.d)[:, None]
        return a.addmm_(torch.cat([self.v, self.ltg], 1), torch.cat([turned, p.T * -lr]), beta=alpha)

    def next_row_gram(self, gram: Tensor, alpha: float, lr: float) -> Tensor:
        """R' R'ᵀ (K, K) for gram = A Aᵀ, A the a of `new_r` (`next_row_gram`)."""
        assert self.ap is not None and self.ptp is not None
        if self.v is None or self.d is None:
            assert self.ltl is not None
            return next_row_gram(gram, alpha * self.ltl, self.ltg, self.ap, self.ptp, lr)
        return _next_row_gram_nearest(gram, alpha, self.v, self.d, self.ltg, self.ap, self.ptp, lr)


def subspace_step(L: Tensor, A: Tensor, G: Tensor, P: Tensor, lr: float, scale: float = 1.0
                  ) -> tuple[Tensor, Tensor, Tensor, bool]:
    """One warm-started subspace-iteration step for W' = L A − η G Pᵀ without any (O, I) tensor.

    L: (O, K) orthonormal, A: (K, I) (the step's A is `scale` · A, so a decayed R needs no scaled copy), G: (O, r),
    P: (I, r) -> L' = orth(W' W'ᵀ L): (O, K), L'ᵀL: (K, K), L'ᵀG: (K, r), and whether the Cholesky-QR below was
    used (else Householder QR).

    With Q = W'ᵀL = Aᵀ − η P Cᵀ (C = LᵀG: (K, r)), W'Q = L X − η G Y, X = A Q = A Aᵀ − η (A P) Cᵀ (K, K) and
    Y = Pᵀ Q = (A P)ᵀ − η (PᵀP) Cᵀ (r, K). For r ≤ K, orth(W'Q) is a Cholesky-QR taken in the coordinates of
    [L, G]: with S = GᵀG and LᵀL = I, (W'Q)ᵀ(W'Q) = XᵀX − η (XᵀC Y + (XᵀC Y)ᵀ) + η² YᵀS Y = TᵀT (float64,
    T upper triangular with positive diagonal), so L' = L (X T⁻¹) − η G (Y T⁻¹), and L'ᵀL, L'ᵀG follow in
    (K, K)- and (K, r)-sized products. That is two (O, K)-sized products (C and L') instead of Householder's
    QR of an (O, K) matrix and L'ᵀL; T is the R factor of QR(W'Q), so L' is its Q up to the signs of columns.
    The rounding of L's orthonormality is not amplified by the conditioning of W'Q (L'ᵀL' − I is
    (XT⁻¹)ᵀ(LᵀL − I)(XT⁻¹) plus rounding); the optimizer re-orthonormalises when it drifts
    (`reorthonormalise`). When r > K (a dense saved input: one column per token), or when the Gram is not
    numerically positive definite (W'Q rank-deficient, min Tᵢᵢ < CHOLESKY_MIN_PIVOT · max Tᵢᵢ), W'Q is formed
    and orthonormalised by Householder QR instead; for r > K, X and Y come from Q (no (r, r) product PᵀP).
    """
    step = _subspace_step(L, A, G, P, lr, scale)
    assert step.ltl is not None
    return step.L, step.ltl, step.ltg, step.drifts


def _subspace_step(L: Tensor, A: Tensor, G: Tensor, P: Tensor, lr: float, scale: float = 1.0,
                   gram: Tensor | None = None) -> _Step:
    """`subspace_step`, taking A Aᵀ (K, K) as `gram` when the caller keeps it (else it is formed, r ≤ K), and
    returning the A P and PᵀP it formed (for `next_row_gram`)."""
    k, r = L.shape[1], G.shape[1]
    c = (G.T @ L).T  # skinny products with r first: 2-3x faster on a 2-core CPU than L.T @ G, A @ P (ViT-B/32 shapes)
    if r > k:  # X, Y through Q itself: (PᵀP) would be an (r, r) product, r·r·I multiply-adds
        q = torch.addmm(A.T, P, c.T, beta=scale, alpha=-lr)
        x, y = scale * (A @ q), P.T @ q
    else:
        ap, ptp = (P.T @ A.T).T, P.T @ P
        x = torch.addmm(factor_product(A, A) if gram is None else gram, ap, c.T, beta=scale * scale,
                        alpha=-lr * scale)
        y = torch.addmm(ap.T, ptp, c.T, beta=scale, alpha=-lr)
        xd, yd, cd, sd = x.double(), y.double(), c.double(), (G.T @ G).double()
        # Gram = Xᵀ(X − η C Y) + Yᵀ(η² S Y − η Cᵀ X): one (K, K, K) product and two of inner size r
        u = torch.addmm(xd, cd, yd, alpha=-lr)
        v = torch.addmm(cd.T @ xd, sd, yd, beta=-lr, alpha=lr * lr)
        gram = torch.addmm(xd.T @ u, yd.T, v)
        t, info = torch.linalg.cholesky_ex(gram, upper=True)
        low, high = torch.aminmax(t.diagonal())
        if bool((info == 0) & (low > CHOLESKY_MIN_PIVOT * high)):
            xt, yt = torch.linalg.solve_triangular(t, torch.cat([xd, yd]), upper=True, left=False).split([k, r])
            new_l = factor_product(L, xt.to(L.dtype).T)  # L (X T⁻¹)
            new_l.addmm_(G, yt.to(L.dtype), alpha=-lr)
            ltl = torch.addmm(xt, cd, yt, alpha=-lr).T.to(L.dtype)
            ltg = torch.addmm(xt.T @ cd, yt.T, sd, alpha=-lr).to(L.dtype)
            return _Step(new_l, ltl, ltg, True, ap, ptp)
    wq = L @ x  # W'Q, orthonormalised by Householder QR
    wq.addmm_(G, y, alpha=-lr)
    new_l = orth(wq)
    return _Step(new_l, new_l.T @ L, new_l.T @ G, False, None, None)


def next_row_gram(gram: Tensor, m: Tensor, n: Tensor, ap: Tensor, ptp: Tensor, lr: float) -> Tensor:
    """R' R'ᵀ for R' = M A − η N Pᵀ without R': gram = A Aᵀ (K, K), m = M (K, K), n = N (K, r), ap = A P (K, r),
    ptp = Pᵀ P (r, r) -> M (A Aᵀ) Mᵀ − η (F Nᵀ + N Fᵀ) with F = M (A P) − (η/2) N (Pᵀ P): (K, K)."""
    f = torch.addmm(m @ ap, n, ptp, alpha=-lr / 2)
    h = (m @ gram) @ m.T
    return h.addmm_(f, n.T, alpha=-lr).addmm_(n, f.T, alpha=-lr)


def _nearest_step(L: Tensor, A: Tensor, G: Tensor, P: Tensor, lr: float, scale: float = 1.0,
                  gram: Tensor | None = None) -> _Step:
    """`_subspace_step` in the nearest basis: L' is the orthonormal basis of span(W'Q) closest to L, written into L
    in place; shapes as there, and L'ᵀL is returned as V (K, r), d (r,) with L'ᵀL = I − V diag(d) Vᵀ.

    G = L C + Q₂ R₂ (C = LᵀG, Q₂ R₂ the QR of G − L C: (O, r), (r, r)) makes [L, Q₂] orthonormal, and in its
    coordinates W'Q = [L, Q₂] [B₁; B₂] with B₁ = LᵀW'Q = X − η C Y = QᵀQ (K, K, symmetric positive definite) and
    B₂ = Q₂ᵀW'Q = −η R₂ Y (r, K), X, Y as in `subspace_step`. So span(W'Q) = span(L + Q₂ T), T = B₂ B₁⁻¹ (r, K).
    With T = U diag(τ) Vᵀ (τ = tan θ, θ the angles between span L and the new span), the basis of the new span
    nearest L (L'ᵀL symmetric positive definite) is

        L' = [L, Q₂] [I; T] (I + TᵀT)^(-1/2) = L + (Q₂ U diag(sin θ) − L V diag(1 − cos θ)) Vᵀ,

    a rank-r update of L; L'ᵀL = I − V diag(1 − cos θ) Vᵀ and L'ᵀG = C − V diag(1 − cos θ) VᵀC + V diag(sin θ) UᵀR₂.
    That is O((O + I) K r) multiply-adds besides A Aᵀ (`gram`) and a (K, K) Cholesky, against the QR basis's (O, K)
    ×(K, K) product for L' and (K, K)×(K, I) for R'. The Cholesky is taken in float32: B₁ itself carries float32
    rounding, which already bounds T's accuracy by about ε₃₂ κ(B₁) relative to T, as it bounds the QR route's.
    When B₁ is not numerically positive definite or κ(B₁) > 1/NEAREST_MIN_PIVOT², the step is `_subspace_step`'s
    (the QR basis), and L is left as it was.
    """
    c = (G.T @ L).T  # (K, r), r first as in _subspace_step
    q2, r2 = torch.linalg.qr(torch.addmm(G, L, c, alpha=-1))
    ap, ptp = (P.T @ A.T).T, P.T @ P
    x = torch.addmm(factor_product(A, A) if gram is None else gram, ap, c.T, beta=scale * scale, alpha=-lr * scale)
    y = torch.addmm(ap.T, ptp, c.T, beta=scale, alpha=-lr)
    b1 = x.addmm_(c, y, alpha=-lr)
    chol, info = torch.linalg.cholesky_ex(b1)
    low, high = torch.aminmax(chol.diagonal())
    if not bool((info == 0) & (low > NEAREST_MIN_PIVOT * high)):
        return _subspace_step(L, A, G, P, lr, scale, gram)
    t = torch.cholesky_solve((r2 @ y).T, chol).T * -lr  # T = B₂ B₁⁻¹
    u, tau, vh = torch.linalg.svd(t, full_matrices=False)
    sec = (1 + tau * tau).sqrt()
    sin, d = tau / sec, tau * tau / (sec * (1 + sec))  # sin θ, 1 − cos θ (without cancellation)
    v = vh.T
    ltg = torch.addmm(torch.addmm(c, v * d, v.T @ c, alpha=-1), v * sin, u.T @ r2)
    turn = (v.T @ L.T).T * -d  # −L V diag(1 − cos θ): (O, r)
    turn.addmm_(q2, u * sin)
    L.addmm_(turn, v.T)
    return _Step(L, None, ltg, True, ap, ptp, v, d)


def _next_row_gram_nearest(gram: Tensor, alpha: float, v: Tensor, d: Tensor, n: Tensor, ap: Tensor, ptp: Tensor,
                           lr: float) -> Tensor:
    """`next_row_gram` for M = α (I − E Vᵀ), E = V diag(d) (the nearest basis), in O(K² r): with Z = H V,
    Y = Z − ½ E (VᵀZ), M H Mᵀ = α² (H − E Yᵀ − Y Eᵀ), so H' = α² H − S − Sᵀ, S = [E, F] [α² Y, η N]ᵀ (K, K)."""
    e = v * d
    z = gram @ v
    y = z.addmm_(e, v.T @ z, alpha=-0.5)
    f = torch.addmm(ap, e, v.T @ ap, alpha=-1).mul_(alpha).addmm_(n, ptp, alpha=-lr / 2)
    s = torch.cat([e, f], 1) @ torch.cat([(alpha * alpha) * y, lr * n], 1).T
    return ((alpha * alpha) * gram).sub_(s).sub_(s.T)


def reorthonormalise(L: Tensor, R: Tensor, momentum: Tensor | None, tol: float = ORTH_TOL
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(L, R, C) with L: (O, K) orthonormal again when max_j |‖L[:, j]‖² − 1| > tol, W = L R unchanged.

    L = Q T (Householder) gives L ← Q, R ← T R, and the momentum buffer C: (K, I) (coordinates of the dense
    buffer in the columns of L) C ← T C. The column norms are the check: repeated rounding moves them first.
    """
    if float((L.square().sum(0) - 1).abs().max()) <= tol:
        return L, R, momentum
    q, t = torch.linalg.qr(L, mode="reduced")
    return q, t @ R, None if momentum is None else t @ momentum


def _resync(layer: WSILinear) -> None:
    """Re-derive L, R from the updated dense weight W' (O, I): "reference" by one subspace-iteration step
    from L, then W ← L R; "svd" by a fresh truncated SVD at the layer's ε (new buffers, K may change)."""
    w = layer.weight
    if layer.weight_update == "svd":
        assert layer.epsilon is not None  # WSILinear requires it for "svd"
        layer.L, layer.R = low_rank_factors(w, layer.epsilon)
        return
    new_l = orth(w @ (w.T @ layer.L))
    new_r = new_l.T @ w
    layer.L.copy_(new_l)
    layer.R.copy_(new_r)
    w.copy_(new_l @ new_r)
