"""Subspace primitives against independent computations (NumPy SVD, einsum, known spectra)."""
import numpy as np
import pytest
import torch

from wasi import explained_variance_rank, orth, subspace_iteration, truncated_hosvd, tucker, tucker_reconstruct

torch.set_num_threads(1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _np_unfold(x: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)


def _einsum_core(x: torch.Tensor, factors) -> torch.Tensor:
    letters = "abcd"[: x.dim()]
    ranks = "wxyz"[: x.dim()]
    spec = ",".join(f"{l}{r}" for l, r in zip(letters, ranks))
    return torch.einsum(f"{letters},{spec}->{ranks}", x, *factors)


def test_orth_orthonormal_same_span_and_float32_for_bf16():
    m = torch.randn(12, 4)
    q = orth(m)
    assert q.shape == (12, 4)
    torch.testing.assert_close(q.T @ q, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(q @ (q.T @ m), m, atol=1e-5, rtol=1e-5)  # span(Q) = span(M)
    mb = m.bfloat16()
    qb = orth(mb)
    assert qb.dtype == torch.bfloat16
    q64 = torch.from_numpy(np.linalg.qr(mb.double().numpy())[0])
    torch.testing.assert_close(qb.double().abs(), q64.abs(), atol=1e-2, rtol=0)


def test_explained_variance_rank_hand_values():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: cumulative 0.643, 0.929, 1
    assert [explained_variance_rank(s, e) for e in (0.1, 0.64, 0.65, 0.92, 0.93, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert explained_variance_rank(torch.zeros(4), 0.9) == 1


def test_subspace_iteration_converges_to_dominant_subspace():
    u, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(15, 15, dtype=torch.float64))
    s = torch.tensor([10.0, 8.0, 6.0] + [0.5] * 12, dtype=torch.float64)
    m = u[:, :15] * s @ v.T
    basis = orth(torch.randn(20, 3, dtype=torch.float64))
    for _ in range(10):
        basis = subspace_iteration(m, basis)
    top = u[:, :3]
    torch.testing.assert_close(basis @ basis.T, top @ top.T, atol=1e-8, rtol=0)


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 3, 4, 5)])
def test_tucker_full_ranks_is_exact_and_core_matches_einsum(shape):
    x = torch.randn(*shape, dtype=torch.float64)
    core, factors = tucker(x, list(shape), generator=_gen())
    for u, n in zip(factors, shape):
        assert u.shape == (n, n)
        torch.testing.assert_close(u.T @ u, torch.eye(n, dtype=x.dtype))
    torch.testing.assert_close(core, _einsum_core(x, factors))
    torch.testing.assert_close(tucker_reconstruct(core, factors), x)


def test_tucker_recovers_exact_low_multilinear_rank_tensor():
    ranks = (2, 3, 2, 4)
    shape = (4, 6, 5, 9)
    g = torch.randn(*ranks, dtype=torch.float64)
    bases = [torch.linalg.qr(torch.randn(n, r, dtype=torch.float64))[0] for n, r in zip(shape, ranks)]
    x = g
    for mode, b in enumerate(bases):
        x = torch.movedim(torch.tensordot(x, b, dims=([mode], [1])), -1, mode)
    core, factors = tucker(x, ranks, generator=_gen(1))
    torch.testing.assert_close(tucker_reconstruct(core, factors), x)
    core2, factors2 = tucker(x, ranks, prev=factors)  # warm start keeps the exact subspace
    torch.testing.assert_close(tucker_reconstruct(core2, factors2), x)


def test_tucker_warm_start_improves_toward_hosvd_and_is_seeded():
    ranks = [2, 4, 3]
    x = tucker_reconstruct(torch.randn(*ranks, dtype=torch.float64),
                           [torch.randn(n, r, dtype=torch.float64) for n, r in zip((4, 10, 12), ranks)])
    x = x + 0.05 * torch.randn_like(x)  # dominant low multilinear rank part plus noise
    first = tucker(x, ranks, generator=_gen(5))
    assert all(torch.equal(a, b) for a, b in zip(first[1], tucker(x, ranks, generator=_gen(5))[1]))
    err = lambda cf: float((tucker_reconstruct(*cf) - x).norm())
    cf = first
    for _ in range(30):
        cf = tucker(x, ranks, prev=cf[1])
    # per-mode truncated SVD bases (NumPy) are the fixed point of the iteration
    best = [torch.from_numpy(np.linalg.svd(_np_unfold(x.numpy(), m))[0][:, :r]) for m, r in enumerate(ranks)]
    hosvd_err = float((tucker_reconstruct(_einsum_core(x, best), best) - x).norm())
    assert err(cf) <= err(first) + 1e-12
    assert err(cf) == pytest.approx(hosvd_err, rel=1e-6)


def test_tucker_clips_ranks_and_reinitialises_on_shape_change():
    x = torch.randn(4, 6, 8)
    core, factors = tucker(x, [10, 10, 3], generator=_gen())
    assert [tuple(u.shape) for u in factors] == [(4, 4), (6, 6), (8, 3)]
    assert core.shape == (4, 6, 3)
    small = torch.randn(1, 6, 8)  # smaller last batch: the batch factor no longer fits
    core, factors = tucker(small, [10, 10, 3], prev=factors, generator=_gen())
    assert [tuple(u.shape) for u in factors] == [(1, 1), (6, 6), (8, 3)]
    with pytest.raises(ValueError, match="one rank per mode"):
        tucker(x, [2, 2], generator=_gen())


@pytest.mark.parametrize("eps", [0.5, 0.9, 1.0])
def test_truncated_hosvd_ranks_follow_numpy_spectra(eps):
    x = torch.randn(3, 6, 8, 5)
    core, factors = truncated_hosvd(x, eps)
    for mode, u in enumerate(factors):
        s = np.linalg.svd(_np_unfold(x.numpy().astype(np.float64), mode), compute_uv=False)
        frac = np.cumsum(s ** 2) / np.sum(s ** 2)
        expected = min(int(np.searchsorted(frac, eps - 1e-12)) + 1, len(s))
        assert u.shape == (x.shape[mode], expected)
    torch.testing.assert_close(core, _einsum_core(x, factors))
    if eps == 1.0:
        torch.testing.assert_close(tucker_reconstruct(core, factors), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 6, 8, 5), (2, 3, 40)])  # wide unfoldings, and a tall one (40 × 6)
def test_truncated_hosvd_bases_span_numpy_leading_singular_vectors(shape):
    x = torch.randn(*shape, dtype=torch.float64)
    _, factors = truncated_hosvd(x, 0.7)
    for mode, u in enumerate(factors):
        ref = np.linalg.svd(_np_unfold(x.numpy(), mode), full_matrices=False)[0][:, : u.shape[1]]
        np.testing.assert_allclose(u.numpy() @ u.numpy().T, ref @ ref.T, atol=1e-4)
