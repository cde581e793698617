"""Subspace primitives: orthonormal bases, subspace iteration, Tucker decompositions.

Mode-m unfolding `X_(m)` puts mode m first and flattens the rest: (n_m, ∏_{j≠m} n_j).
A Tucker decomposition is `x ≈ S ×₁ U₁ ×₂ U₂ … ×_d U_d` with orthonormal `U_m: (n_m, r_m)`
and core `S: (r_1, …, r_d)`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["orth", "explained_variance_rank", "subspace_iteration", "unfold", "mode_product",
           "tucker", "project", "truncated_hosvd", "tucker_reconstruct"]


def orth(m: Tensor) -> Tensor:
    """Q of the reduced QR of `m: (a, k)` -> `(a, k)`, computed in at least float32, returned in m.dtype."""
    return torch.linalg.qr(m.to(torch.promote_types(m.dtype, torch.float32)), mode="reduced").Q.to(m.dtype)


def explained_variance_rank(s: Tensor, eps: float) -> int:
    """Smallest k with Σ_{i≤k} s_i² / Σ_i s_i² ≥ eps, for singular values `s: (n,)` sorted descending."""
    energy = torch.cumsum(s.double().square(), 0)
    if energy[-1] <= 0:
        return 1
    return min(int((energy / energy[-1] < eps).sum()) + 1, s.numel())


def subspace_iteration(m: Tensor, u_prev: Tensor) -> Tensor:
    """One warm-started step `orth(M (Mᵀ U_prev))`. m: (a, b), u_prev: (a, k) -> (a, k)."""
    return orth(m @ (m.T @ u_prev))


def unfold(x: Tensor, mode: int) -> Tensor:
    """Mode-`mode` unfolding X_(m): (n_m, ∏_{j≠m} n_j)."""
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def mode_product(x: Tensor, m: Tensor, mode: int) -> Tensor:
    """x ×_mode m: replaces mode `mode` of x (size n) by m's rows. m: (n', n)."""
    return torch.tensordot(x, m, dims=([mode], [1])).movedim(-1, mode)


def tucker(x: Tensor, ranks: Sequence[int], prev: Sequence[Tensor] | None = None,
           generator: torch.Generator | None = None) -> tuple[Tensor, list[Tensor]]:
    """Tucker decomposition of x by one subspace-iteration step per mode.

    x: (n_1, …, n_d) -> core (r_1, …, r_d), factors [U_m: (n_m, r_m)], with r_m = min(ranks[m], n_m).
    Mode m warm-starts from `prev[m]` when given with shape (n_m, r_m): `U_m = orth(X_(m) (X_(m)ᵀ U_m^prev))`;
    otherwise (first step, or a changed shape such as a smaller last batch) it starts from a Gaussian
    `V: (∏_{j≠m} n_j, r_m)` drawn from `generator`: `U_m = orth(X_(m) V)`.
    """
    if len(ranks) != x.dim():
        raise ValueError(f"need one rank per mode of the {x.dim()}-way input of shape {tuple(x.shape)}, "
                         f"got ranks={list(ranks)}; give {x.dim()} activation ranks")
    factors = []
    for mode, (n, r) in enumerate(zip(x.shape, ranks)):
        r = min(int(r), n)
        xm = unfold(x, mode)
        u_prev = None if prev is None else prev[mode]
        if u_prev is not None and u_prev.shape == (n, r):
            factors.append(subspace_iteration(xm, u_prev.to(x.device, x.dtype)))
        else:
            device = x.device if generator is None else generator.device
            v = torch.randn(xm.shape[1], r, generator=generator, device=device, dtype=torch.float32)
            factors.append(orth(xm @ v.to(x.device, x.dtype)))
    return project(x, factors), factors


def project(x: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """Core `x ×₁ U₁ᵀ … ×_d U_dᵀ`. x: (n_1, …, n_d) -> (r_1, …, r_d)."""
    for mode, u in enumerate(factors):
        x = mode_product(x, u.T, mode)
    return x


def truncated_hosvd(x: Tensor, eps: float) -> tuple[Tensor, list[Tensor]]:
    """Truncated HOSVD: per mode, the leading left singular vectors of X_(m) that explain a
    fraction eps of its energy. x: (n_1, …, n_d) -> core (r_1, …, r_d), factors [U_m: (n_m, r_m)].

    For a wide unfolding (n_m ≤ ∏_{j≠m} n_j) the singular pairs come from the eigendecomposition
    of the small Gram matrix X_(m) X_(m)ᵀ (n_m × n_m); a tall one is small enough for a direct SVD.
    Both in float32.
    """
    factors = []
    for mode in range(x.dim()):
        xm = unfold(x, mode).float()
        if xm.shape[0] <= xm.shape[1]:
            evals, evecs = torch.linalg.eigh(xm @ xm.T)  # ascending
            s, u = evals.flip(0).clamp_min(0).sqrt(), evecs.flip(1)
        else:
            u, s, _ = torch.linalg.svd(xm, full_matrices=False)
        factors.append(u[:, :explained_variance_rank(s, eps)].to(x.dtype))
    return project(x, factors), factors


def tucker_reconstruct(core: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """x̂ = S ×₁ U₁ … ×_d U_d. core: (r_1, …, r_d), factors [U_m: (n_m, r_m)] -> (n_1, …, n_d)."""
    for mode, u in enumerate(factors):
        core = mode_product(core, u, mode)
    return core
