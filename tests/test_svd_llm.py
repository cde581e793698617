import math

import pytest
import torch

from wasi.svd_llm import GramAccumulator, rank_from_epsilon, rank_from_ratio, svd_llm_factors, whitening


def _anisotropic_inputs(n: int, i: int, seed: int = 0) -> torch.Tensor:
    """(n, i) correlated rows: a random mixing of features with geometrically decaying scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(i, i, generator=g, dtype=torch.float64)
    scales = torch.logspace(1, -2, i, dtype=torch.float64)
    return (torch.randn(n, i, generator=g, dtype=torch.float64) * scales) @ mix


def _plain_svd(w: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_gram_accumulator_matches_concatenated_inputs():
    x = _anisotropic_inputs(60, 7)
    acc = GramAccumulator(7)
    for chunk in (x[:10].reshape(2, 5, 7), x[10:35], x[35:].reshape(5, 5, 7)):
        acc.update(chunk.float())
    xf = x.float().double()
    assert acc.count == 60
    assert torch.allclose(acc.gram, xf.T @ xf, rtol=1e-12, atol=1e-10)
    with pytest.raises(ValueError, match="last dim 7"):
        acc.update(torch.zeros(3, 6))


def test_whitening_is_cholesky_of_gram():
    x = _anisotropic_inputs(200, 10)
    a = x.T @ x
    c = whitening(a)
    assert torch.equal(c, torch.tril(c))
    assert torch.allclose(c @ c.T, a, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("k", [1, 3, 6, 9])
def test_whitened_truncation_beats_plain_svd_and_attains_optimum(k):
    o, i = 12, 16
    x = _anisotropic_inputs(400, i, seed=k)
    w = torch.randn(o, i, generator=torch.Generator().manual_seed(100 + k), dtype=torch.float64)
    acc = GramAccumulator(i)
    acc.update(x)
    w_u, w_v = svd_llm_factors(w, whitening(acc.gram), k)
    assert w_u.shape == (o, k) and w_v.shape == (k, i)
    err = torch.linalg.matrix_norm((w - w_u @ w_v) @ x.T)
    err_plain = torch.linalg.matrix_norm((w - _plain_svd(w, k)) @ x.T)
    # Independent optimum: the best rank-k error of W·A^½ (A^½ from an eigendecomposition).
    evals, evecs = torch.linalg.eigh(x.T @ x)
    s = torch.linalg.svdvals(w @ (evecs * evals.clamp_min(0).sqrt()) @ evecs.T)
    optimum = s[k:].square().sum().sqrt()
    assert err <= err_plain * (1 + 1e-9)
    assert err < 0.9 * err_plain
    assert torch.isclose(err, optimum, rtol=1e-6)


def test_full_rank_reproduces_weight():
    w = torch.randn(9, 6, generator=torch.Generator().manual_seed(1))
    x = _anisotropic_inputs(50, 6)
    w_u, w_v = svd_llm_factors(w, whitening(x.T @ x), 6)
    assert w_u.dtype == w.dtype and w_v.dtype == w.dtype
    assert torch.allclose(w_u @ w_v, w, atol=1e-5)


def test_singular_gram_gives_finite_factors():
    x = _anisotropic_inputs(100, 8)
    x = torch.cat([x, x[:, :3], torch.zeros(100, 1, dtype=x.dtype)], dim=1)  # 3 duplicated + 1 dead feature
    a = x.T @ x
    assert torch.linalg.matrix_rank(a) == 8
    c = whitening(a)
    assert torch.isfinite(c).all() and torch.diagonal(c).min() > 0
    assert torch.allclose(c @ c.T, a, atol=1e-4 * float(torch.trace(a)) / 12)
    w = torch.randn(5, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w_u, w_v = svd_llm_factors(w, c, 4)
    assert torch.isfinite(w_u).all() and torch.isfinite(w_v).all()
    err = torch.linalg.matrix_norm((w - w_u @ w_v) @ x.T)
    assert err <= torch.linalg.matrix_norm((w - _plain_svd(w, 4)) @ x.T)


def test_zero_gram_gives_identity_scaled_whitening():
    c = whitening(torch.zeros(4, 4))
    assert torch.isfinite(c).all()
    assert torch.allclose(c, torch.eye(4, dtype=c.dtype) * c[0, 0])


@pytest.mark.parametrize("o,i,rho", [(768, 3072, 0.5), (3072, 768, 0.25), (10, 10, 1.0), (7, 13, 0.3), (192, 576, 0.9)])
def test_rank_from_ratio_formula(o, i, rho):
    k = rank_from_ratio(o, i, rho)
    assert k == math.floor(o * i * rho / (o + i))
    assert k * (o + i) <= o * i * rho < (k + 1) * (o + i)


def test_rank_from_ratio_hand_case():
    assert rank_from_ratio(768, 3072, 0.5) == 307  # 768·3072·0.5 / 3840 = 307.2
    assert rank_from_ratio(10, 10, 1.0) == 5  # 100 / 20


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.5, float("nan")])
def test_rank_from_ratio_rejects_bad_rho(rho):
    with pytest.raises(ValueError, match=r"rho must be in \(0, 1\]"):
        rank_from_ratio(8, 8, rho)


def test_rank_from_ratio_rejects_rank_zero():
    with pytest.raises(ValueError, match="gives rank 0"):
        rank_from_ratio(4, 4, 0.1)


def test_rank_from_epsilon_is_explained_variance_of_singular_values():
    u, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(3)))
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(4)))
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 1.0, 1.0])  # s² = 16, 9, 4, 1, 1, 1; total 32
    w = u[:, :6] @ torch.diag(s) @ v.T
    # cumulative fractions: 0.5, 0.78125, 0.90625, 0.9375, 0.96875, 1.0
    assert rank_from_epsilon(w, 0.49) == 1
    assert rank_from_epsilon(w, 0.6) == 2
    assert rank_from_epsilon(w, 0.9) == 3
    assert rank_from_epsilon(w, 0.95) == 5
    assert rank_from_epsilon(w, 1.0) == 6
