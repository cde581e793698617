"""SVD-LLM truncation-aware whitening (Wang et al., ICLR 2025) for one linear layer.

With A = Σ xᵀx = C Cᵀ over calibration inputs, the rank-k factors W_u W_v from the SVD of
W C minimise ‖(W − W_u W_v) Xᵀ‖_F over all rank-k matrices.
"""
from __future__ import annotations

import math

import torch

from wasi.subspace import explained_variance_rank, svd

__all__ = ["GramAccumulator", "rank_from_epsilon", "rank_from_ratio", "svd_llm_factors", "whitening"]


class GramAccumulator:
    """Accumulates A = Σ xᵀx over calibration batches in float64.

    x: (..., I) of any leading shape; `gram`: (I, I); `count`: number of rows seen.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.gram.shape[0]:
            raise ValueError(f"expected inputs with last dim {self.gram.shape[0]}, got shape {tuple(x.shape)}")
        rows = x.detach().reshape(-1, x.shape[-1]).to(device=self.gram.device, dtype=torch.float64)
        self.gram += rows.T @ rows
        self.count += rows.shape[0]


def whitening(a: torch.Tensor, jitter: float = 1e-6) -> torch.Tensor:
    """Lower-triangular C with A = C Cᵀ (A: (I, I) symmetric PSD) -> C: (I, I), float64.

    If A is not numerically positive definite (Cholesky fails, or a pivot² falls below
    jitter × trace(A)/I), A is shifted by |λ_min| + jitter × trace(A)/I (trace 0: shift 1)
    and factorised again; the jitter grows tenfold until Cholesky succeeds, so singular A
    (e.g. duplicated features) gives a finite C.
    """
    a = a.to(torch.float64)
    a = (a + a.T) / 2
    n = a.shape[0]
    scale = float(torch.trace(a)) / n
    scale = scale if scale > 0 else 1.0
    c, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0 and float(torch.diagonal(c).min()) ** 2 >= jitter * scale:
        return c
    shift = max(-float(torch.linalg.eigvalsh(a)[0]), 0.0)
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    for step in range(12):
        c, info = torch.linalg.cholesky_ex(a + (shift + jitter * scale * 10**step) * eye)
        if int(info) == 0:
            return c
    raise ValueError("Gram matrix could not be made positive definite; check the calibration activations for NaN/inf")


def svd_llm_factors(w: torch.Tensor, c: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncation-aware factors of W: (O, I) with whitening C: (I, I) lower-triangular.

    SVD W C = U Σ Vᵀ; returns W_u = U_k Σ_k^{1/2}: (O, k) and W_v = Σ_k^{1/2} V_kᵀ C⁻¹: (k, I)
    (C⁻¹ by triangular solve), computed in float64 and cast to W's dtype.
    """
    o, i = w.shape
    if not 1 <= k <= min(o, i):
        raise ValueError(f"rank k must be in [1, min(O, I)] = [1, {min(o, i)}], got {k}")
    c = c.to(device=w.device, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w.to(torch.float64) @ c, full_matrices=False)
    root = s[:k].sqrt()
    w_u = u[:, :k] * root
    w_v = torch.linalg.solve_triangular(c, root[:, None] * vh[:k], upper=False, left=False)  # X C = Σ^½ Vᵀ
    return w_u.to(w.dtype), w_v.to(w.dtype)


def rank_from_ratio(out_features: int, in_features: int, rho: float) -> int:
    """k = ⌊O·I·ρ / (O + I)⌋: the rank whose factors hold a fraction ρ ∈ (0, 1] of W's parameters."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"parameter ratio rho must be in (0, 1], got {rho}")
    k = math.floor(out_features * in_features * rho / (out_features + in_features))
    if k < 1:
        min_rho = (out_features + in_features) / (out_features * in_features)
        raise ValueError(f"rho={rho} gives rank 0 for a {out_features}×{in_features} weight; use rho >= {min_rho:.4g}")
    return k


def rank_from_epsilon(w: torch.Tensor, eps: float) -> int:
    """The weight rank K that WASI's ε gives for W: (O, I): explained variance of its float32 singular values
    (the same SVD and rule as the WSI layer init)."""
    return explained_variance_rank(svd(w)[1], eps)
