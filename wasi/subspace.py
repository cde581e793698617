"""Subspace primitives: orthonormal bases, subspace iteration, Tucker decompositions.

Mode-m unfolding `X_(m)` puts mode m first and flattens the rest: (n_m, ∏_{j≠m} n_j).
A Tucker decomposition is `x ≈ S ×₁ U₁ ×₂ U₂ … ×_d U_d` with orthonormal `U_m: (n_m, r_m)`
and core `S: (r_1, …, r_d)`.

Mode contractions never form an unfolding: a contiguous x is viewed, for free, as (A, n_m, C)
with A = ∏_{j<m} n_j and C = ∏_{j>m} n_j, and every product with X_(m) is a (batched) matmul
over that view (`mode_product`, `mode_gram`, `mode_cross`).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.profiler import record_function

__all__ = ["cheapest_order", "explained_variance_rank", "gram_is_cheaper", "last_mode_warm_start", "mode_cross",
           "mode_gram", "mode_product", "mode_view", "orth", "project", "seeded_normal", "subspace_iteration", "svd",
           "truncated_hosvd", "tucker", "tucker_ranks", "tucker_reconstruct", "unfold"]


def orth(m: Tensor) -> Tensor:
    """Q of the reduced QR of `m: (a, k)` -> `(a, k)`, computed in at least float32, returned in m.dtype."""
    return torch.linalg.qr(m.to(torch.promote_types(m.dtype, torch.float32)), mode="reduced").Q.to(m.dtype)


def svd(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD `m = U diag(S) Vᵀ` of `m: (a, b)` in float32 -> U: (a, k), S: (k,), Vᵀ: (k, b), k = min(a, b).

    LAPACK's divide-and-conquer SVD can fail to converge on a float32 matrix with many (nearly) repeated
    singular values; it is then taken in float64 and returned in float32.
    """
    m = m.detach().float()
    try:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = (t.float() for t in torch.linalg.svd(m.double(), full_matrices=False))
    return u, s, vh


def explained_variance_rank(s: Tensor, eps: float) -> int:
    """Smallest k with Σ_{i≤k} s_i² / Σ_i s_i² ≥ eps, for singular values `s: (n,)` sorted descending."""
    energy = torch.cumsum(s.double().square(), 0)
    if energy[-1] <= 0:
        return 1
    return min(int((energy / energy[-1] < eps).sum()) + 1, s.numel())


_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A bijective hash of 32-bit values held in int64: xor-shift-multiply with odd multipliers below 2³¹ (from
    Chris Wellons' hash-prospector), so no int64 product overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def seeded_normal(shape: Sequence[int], seed: int | Tensor, stream: int, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal samples of `shape`, a pure function of (seed, stream, element index): counter-based.

    Counter j hashes to a 32-bit integer (`_mix32` of j plus a key from seed and stream: integer tensor ops only),
    whose top 23 bits give a uniform u ∈ (0, 1); pairs (u₁, u₂) give √(−2 ln u₁) (cos, sin)(2π u₂) (Box–Muller).
    No generator object and no RNG state: the same numbers eagerly, under torch.compile (which traces it as
    ordinary ops) and on any device, up to the last bit of log, cos and sin; the global RNG is never touched.
    `seed` may be an int64 scalar tensor (a layer's buffer, so compiled code does not specialise on its value).
    """
    n = math.prod(shape)
    half = (n + 1) // 2
    seed_t = torch.as_tensor(seed, dtype=torch.int64, device=device)
    key = _mix32((_mix32(seed_t & _MASK32) + 0x9E3779B9 * (stream + 1)) & _MASK32)
    counter = torch.arange(2 * half, dtype=torch.int64, device=seed_t.device)
    bits = _mix32((counter + key) & _MASK32) >> 9  # 23 bits: (bits + 0.5) / 2²³ is exact in float32
    u = (bits.to(torch.float32) + 0.5) * 2.0 ** -23
    radius, angle = torch.sqrt(-2.0 * torch.log(u[:half])), (2 * math.pi) * u[half:]
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
    return z.reshape(*shape).to(dtype)


def subspace_iteration(m: Tensor, u_prev: Tensor) -> Tensor:
    """One warm-started step `orth(M (Mᵀ U_prev))`. m: (a, b), u_prev: (a, k) -> (a, k)."""
    return orth(m @ (m.T @ u_prev))


def unfold(x: Tensor, mode: int) -> Tensor:
    """Mode-`mode` unfolding X_(m): (n_m, ∏_{j≠m} n_j). A copy; the contractions below avoid it."""
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def mode_view(x: Tensor, mode: int) -> Tensor:
    """x: (n_1, …, n_d) viewed as (A, n_m, C), A = ∏_{j<m} n_j, C = ∏_{j>m} n_j (free for contiguous x).

    Column a·C + c of X_(m) is `view[a, :, c]`: the unfolding's column order."""
    return x.reshape(math.prod(x.shape[:mode]), x.shape[mode], -1)


def mode_product(x: Tensor, m: Tensor, mode: int) -> Tensor:
    """x ×_mode m: replaces mode `mode` of x (size n) by m's rows. x: (…, n, …), m: (n', n) -> (…, n', …).

    The result is contiguous; x is only viewed (copied first if it is not contiguous)."""
    v = mode_view(x, mode)
    a, _, c = v.shape
    if a == 1:
        out = m @ v[0]
    elif c == 1:
        out = v[..., 0] @ m.T
    else:
        out = torch.bmm(m.expand(a, *m.shape), v)
    return out.reshape(*x.shape[:mode], m.shape[0], *x.shape[mode + 1:])


def mode_gram(x: Tensor, mode: int) -> Tensor:
    """X_(m) X_(m)ᵀ: (n_m, n_m), without unfolding x."""
    return mode_cross(x, x, mode)


def mode_cross(x: Tensor, y: Tensor, mode: int) -> Tensor:
    """X_(m) Y_(m)ᵀ for x, y equal in every mode but m. x: (…, n, …), y: (…, k, …) -> (n, k).

    Inner modes: one product per leading index, summed in at least float32. For small k the product is taken
    as (Y_(m) X_(m)ᵀ)ᵀ, the orientation whose matrix product runs 1.4-2.6× faster on x86 CPUs (MKL) for the
    thin factors of a Tucker step: last mode always, inner modes for k ≤ 8, the first mode for k ≤ 3."""
    vx, vy = mode_view(x, mode), mode_view(y, mode)
    k = vy.shape[1]
    if vx.shape[0] == 1:
        return (vy[0] @ vx[0].T).T if k <= 3 else vx[0] @ vy[0].T
    if vx.shape[2] == 1:
        return (vy[..., 0].T @ vx[..., 0]).T
    acc = torch.promote_types(x.dtype, torch.float32)
    if k <= 8:
        return torch.bmm(vy, vx.transpose(1, 2)).sum(0, dtype=acc).to(x.dtype).T
    return torch.bmm(vx, vy.transpose(1, 2)).sum(0, dtype=acc).to(x.dtype)


def cheapest_order(shape: Sequence[int], ranks: Sequence[int], modes: Sequence[int]) -> list[int]:
    """The order of contracting `modes` of a tensor of `shape`, mode m from shape[m] to ranks[m], that takes the
    fewest multiply-adds: a contraction costs the current size times r_m (the result does not depend on order).
    At most 4! orders are tried; Python ints only, so it costs nothing at run time and traces as a constant."""
    best: tuple[int, ...] = tuple(modes)
    best_cost = -1
    for order in itertools.permutations(modes):
        size, cost = math.prod(shape), 0
        for m in order:
            cost += size * ranks[m]
            size = size // shape[m] * ranks[m]
        if best_cost < 0 or cost < best_cost:
            best, best_cost = order, cost
    return list(best)


def tucker_ranks(shape: Sequence[int], ranks: Sequence[int]) -> list[int]:
    """Ranks `tucker` uses for an input of `shape`: r_m = min(ranks[m], n_m, ∏_{j≠m} n_j).

    X_(m) has rank at most min(n_m, ∏_{j≠m} n_j), so a larger r_m stores more than x itself."""
    if len(ranks) != len(shape):
        raise ValueError(f"need one rank per mode of the {len(shape)}-way input of shape {tuple(shape)}, "
                         f"got ranks={list(ranks)}; give {len(shape)} activation ranks")
    total = math.prod(shape)
    return [min(int(r), n, total // n) for n, r in zip(shape, ranks)]


PASS_COST = 24
"""One pass over a tensor costs about as much as this many multiply-adds per element, for `gram_is_cheaper`.

Thin products such as X_(m) U (r_m columns) are bound by memory, not arithmetic. The batch mode of ViT-B/32's MLP
inputs (n = 32) was faster through its Gram matrix at r = 7 to 9 on 2-core x86 CPUs (an AMD EPYC and an Intel
Xeon, AVX-512) and slower at r = 2 (the EPYC), which puts the cost of a pass between 18 and 28 multiply-adds per
element (docs/results.md, "Fewer passes in the Tucker step")."""


def gram_is_cheaper(n: int, r: int, rest: int) -> bool:
    """Whether mode m (n_m = n, r_m = r, rest = ∏_{j≠m} n_j) takes its warm-started step through the Gram matrix,
    `orth((X_(m) X_(m)ᵀ) U^prev)`, rather than as `orth(X_(m) (X_(m)ᵀ U^prev))`.

    Multiply-adds plus `PASS_COST` per element for each pass over x: the Gram matrix, n² rest + n² r and one
    pass, against 2 n r rest and two passes."""
    return n * n * rest + n * n * r + PASS_COST * n * rest <= 2 * n * r * rest + 2 * PASS_COST * n * rest


def last_mode_warm_start(shape: Sequence[int], ranks: Sequence[int], prev: Sequence[Tensor] | None) -> Tensor | None:
    """U_d^prev: (n_d, r_d) when `tucker(x, ranks, prev)` of an x of `shape` takes its last mode's step as two
    products, `orth(X_(d) (X_(d)ᵀ U_d^prev))`, else None. A caller that reads x anyway can then take the first,
    `x ×_d U_d^prevᵀ` (…, r_d), in the same pass and hand it to `tucker` as `last`."""
    d = len(shape) - 1
    n, r = shape[d], tucker_ranks(shape, ranks)[d]
    u_prev = None if prev is None or len(prev) != len(shape) else prev[d]
    if r == n or u_prev is None or tuple(u_prev.shape) != (n, r) or gram_is_cheaper(n, r, math.prod(shape) // n):
        return None
    return u_prev


@record_function("wasi.tucker")
def tucker(x: Tensor, ranks: Sequence[int], prev: Sequence[Tensor] | None = None,
           generator: torch.Generator | None = None, seed: int | Tensor | None = None,
           last: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """Tucker decomposition of x by one subspace-iteration step per mode.

    x: (n_1, …, n_d) -> core (r_1, …, r_d), factors [U_m: (n_m, r_m)], r_m from `tucker_ranks`.
    A mode with r_m = n_m keeps everything: U_m is exactly the identity (no QR, no product; the core
    keeps that mode of x as is), so a square factor returned here is always I.
    Otherwise mode m warm-starts from `prev[m]` when given with shape (n_m, r_m):
    `U_m = orth(X_(m) (X_(m)ᵀ U_m^prev))`, computed as `orth((X_(m) X_(m)ᵀ) U_m^prev)` when the Gram
    matrix is cheaper (`gram_is_cheaper`: one pass over x instead of two). Without a usable prev (first
    step, or a changed shape such as a smaller last batch) it starts from a Gaussian `V: (∏_{j≠m} n_j, r_m)`:
    `U_m = orth(X_(m) V)`, V from `seeded_normal(…, seed, stream=m)` when `seed` is given (what the layers use:
    compile-friendly, no RNG state), else drawn from `generator` (torch's default generator when None). One QR
    per compressed mode. `last`: x ×_d U_d^prevᵀ, (n_1, …, n_{d-1}, r_d), computed by the caller for
    the U_d^prev that `last_mode_warm_start` names; the last mode's step then reads x once instead of twice.
    """
    shape = tuple(x.shape)
    r_all = tucker_ranks(shape, ranks)
    if last is not None:
        if last_mode_warm_start(shape, ranks, prev) is None or tuple(last.shape) != (*shape[:-1], r_all[-1]):
            raise ValueError(f"last of shape {tuple(last.shape)} given, but the last mode of this {shape} input "
                             f"does not take a two-product warm start of rank {r_all[-1]} (last_mode_warm_start)")
    x = x.contiguous()
    factors = []
    for mode, (n, r) in enumerate(zip(shape, r_all)):
        if r == n:
            factors.append(torch.eye(n, dtype=x.dtype, device=x.device))
            continue
        u_prev = None if prev is None else prev[mode]
        if u_prev is not None and tuple(u_prev.shape) == (n, r):
            u_prev = u_prev.to(x.device, x.dtype)
            if gram_is_cheaper(n, r, x.numel() // n):
                factors.append(orth(mode_gram(x, mode) @ u_prev))
            else:
                y = last if last is not None and mode == len(shape) - 1 else mode_product(x, u_prev.T, mode)
                factors.append(orth(mode_cross(x, y, mode)))
        else:
            v_shape = (*shape[:mode], r, *shape[mode + 1:])  # V_(m)ᵀ: the Gaussian V laid out as x, mode m of size r
            if seed is not None:
                v = seeded_normal(v_shape, seed, mode, x.device)
            else:
                device = x.device if generator is None else generator.device
                v = torch.randn(*v_shape, generator=generator, device=device, dtype=torch.float32)
            factors.append(orth(mode_cross(x, v.to(x.device, x.dtype), mode)))
    return _project(x, factors, [r == n for n, r in zip(shape, r_all)]), factors


def _project(x: Tensor, factors: Sequence[Tensor], skip: Sequence[bool]) -> Tensor:
    """x ×_m U_mᵀ over the modes not in `skip`, in the cheapest order (the result does not depend on order)."""
    ranks = [u.shape[1] for u in factors]
    for mode in cheapest_order(x.shape, ranks, [m for m in range(x.dim()) if not skip[m]]):
        x = mode_product(x, factors[mode].T, mode)
    return x


def project(x: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """Core `x ×₁ U₁ᵀ … ×_d U_dᵀ`. x: (n_1, …, n_d) -> (r_1, …, r_d)."""
    return _project(x.contiguous(), factors, [False] * x.dim())


def truncated_hosvd(x: Tensor, eps: float) -> tuple[Tensor, list[Tensor]]:
    """Truncated HOSVD: per mode, the leading left singular vectors of X_(m) that explain a
    fraction eps of its energy. x: (n_1, …, n_d) -> core (r_1, …, r_d), factors [U_m: (n_m, r_m)].

    For a wide unfolding (n_m ≤ ∏_{j≠m} n_j) the singular pairs come from the eigendecomposition
    of the small Gram matrix X_(m) X_(m)ᵀ (n_m × n_m); a tall one is small enough for a direct SVD.
    Both in float32.
    """
    xf = x.float().contiguous()
    factors = []
    for mode in range(x.dim()):
        n = x.shape[mode]
        if n * n <= x.numel():
            evals, evecs = torch.linalg.eigh(mode_gram(xf, mode))  # ascending
            s, u = evals.flip(0).clamp_min(0).sqrt(), evecs.flip(1)
        else:
            u, s, _ = svd(unfold(xf, mode))
        factors.append(u[:, :explained_variance_rank(s, eps)].to(x.dtype))
    return project(x, factors), factors


def tucker_reconstruct(core: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """x̂ = S ×₁ U₁ … ×_d U_d. core: (r_1, …, r_d), factors [U_m: (n_m, r_m)] -> (n_1, …, n_d)."""
    core = core.contiguous()
    for mode, u in enumerate(factors):
        core = mode_product(core, u, mode)
    return core
