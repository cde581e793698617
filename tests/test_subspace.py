"""Subspace primitives against independent computations (NumPy SVD, einsum, known spectra)."""
import numpy as np
import pytest
import torch

import wasi.layers
import wasi.subspace
from wasi import explained_variance_rank, orth, subspace_iteration, truncated_hosvd, tucker, tucker_reconstruct


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


# --- In-place mode contractions against the unfolding-based formulas (reference kept here, not in wasi) ---

def _ref_unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def _ref_mode_product(x: torch.Tensor, m: torch.Tensor, mode: int) -> torch.Tensor:
    return torch.tensordot(x, m, dims=([mode], [1])).movedim(-1, mode)


def _ref_weight_grad(dy, core, factors):
    z = dy
    for mode, u in enumerate(factors[:-1]):
        z = _ref_mode_product(z, u.T, mode)
    lead = list(range(core.dim() - 1))
    return torch.tensordot(z, core, dims=(lead, lead))


SHAPES = [(7,), (3, 5), (4, 6, 5), (2, 3, 4, 5), (1, 4, 3), (3, 1, 4, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_mode_contractions_equal_unfolding_formulas(shape):
    from wasi.subspace import mode_cross, mode_gram, mode_product, mode_view
    x = torch.randn(*shape, dtype=torch.float64)
    for mode, n in enumerate(shape):
        v = mode_view(x, mode)
        assert v.data_ptr() == x.data_ptr()  # a view, not a copy
        torch.testing.assert_close(v.transpose(0, 1).reshape(n, -1), _ref_unfold(x, mode))
        m = torch.randn(3, n, dtype=torch.float64)
        torch.testing.assert_close(mode_product(x, m, mode), _ref_mode_product(x, m, mode))
        torch.testing.assert_close(mode_gram(x, mode), _ref_unfold(x, mode) @ _ref_unfold(x, mode).T)
        y = _ref_mode_product(x, m, mode).contiguous()
        torch.testing.assert_close(mode_cross(x, y, mode), _ref_unfold(x, mode) @ _ref_unfold(y, mode).T)


@pytest.mark.parametrize("pass_cost", [0, 24, 10**6])  # 0: the multiply-adds alone choose; 10**6: Gram everywhere
@pytest.mark.parametrize("ranks", [[2, 3, 2, 4], [1, 2, 4, 2], [2, 6, 3, 5]])
def test_tucker_warm_start_equals_unfolding_formula(ranks, pass_cost, monkeypatch):
    monkeypatch.setattr(wasi.subspace, "PASS_COST", pass_cost)
    shape = (3, 6, 5, 9)
    x = torch.randn(*shape, dtype=torch.float64)
    prev = [orth(torch.randn(n, r, dtype=torch.float64)) if r < n else torch.eye(n, dtype=torch.float64)
            for n, r in zip(shape, ranks)]
    core, factors = tucker(x, ranks, prev=prev)
    for mode, (u, u_prev) in enumerate(zip(factors, prev)):
        xm = _ref_unfold(x, mode)
        expected = orth(xm @ (xm.T @ u_prev)) if ranks[mode] < shape[mode] else torch.eye(shape[mode], dtype=x.dtype)
        torch.testing.assert_close(u, expected, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(core, _einsum_core(x, factors))


def test_gram_route_is_taken_where_the_pass_count_says(monkeypatch):
    """ViT-B/32's MLP inputs at batch 32: the batch mode (n = 32) goes through its Gram matrix at the ranks of
    eps = 0.8 (7 to 9), where it measured faster, and as two products at r = 2 (eps = 0.4), where it measured
    slower; the token and feature modes always as two products. tucker takes the route the rule names."""
    from wasi.subspace import gram_is_cheaper
    assert gram_is_cheaper(32, 7, 50 * 3072) and gram_is_cheaper(32, 9, 50 * 768)
    assert not gram_is_cheaper(32, 2, 50 * 3072) and not gram_is_cheaper(32, 2, 50 * 768)
    assert not gram_is_cheaper(50, 4, 32 * 3072) and not gram_is_cheaper(3072, 4, 32 * 50)
    grams: list[int] = []
    real = wasi.subspace.mode_gram
    monkeypatch.setattr(wasi.subspace, "mode_gram", lambda x, mode: grams.append(mode) or real(x, mode))
    x = torch.randn(32, 50, 768)
    for ranks, expected in [([9, 4, 8], [0]), ([2, 1, 2], [])]:
        _, prev = tucker(x, ranks, seed=0)
        grams.clear()
        tucker(x, ranks, prev)
        assert grams == expected


def test_tucker_takes_the_last_modes_product_from_the_caller():
    """`last` = x ×_d U_d^prevᵀ for the U_d^prev that last_mode_warm_start names: the same decomposition, the
    given product used (a wrong one changes the factor). Refused where the last mode has no two-product step."""
    from wasi.subspace import last_mode_warm_start, mode_product
    x = torch.randn(4, 6, 40, dtype=torch.float64)
    ranks = [2, 3, 4]
    _, prev = tucker(x, ranks, seed=0)
    u_prev = last_mode_warm_start(x.shape, ranks, prev)
    assert u_prev is prev[2]
    last = mode_product(x, u_prev.T, 2)
    core, factors = tucker(x, ranks, prev)
    core_l, factors_l = tucker(x, ranks, prev, last=last)
    torch.testing.assert_close(core_l, core)
    for u, v in zip(factors_l, factors):
        torch.testing.assert_close(u, v)
    assert not torch.allclose(tucker(x, ranks, prev, last=2 * last + 1)[1][2], factors[2])
    assert last_mode_warm_start(x.shape, ranks, None) is None  # the first step: a Gaussian start
    assert last_mode_warm_start(x.shape, [2, 3, 40], prev) is None  # a full-rank mode keeps I
    assert last_mode_warm_start((4, 6, 5), [2, 3, 4], [orth(torch.randn(n, r)) for n, r in [(4, 2), (6, 3), (5, 4)]]
                                ) is None  # n = 5 ≤ 2 r + PASS_COST: the Gram route, one pass already
    with pytest.raises(ValueError, match="last_mode_warm_start"):
        tucker(x, ranks, None, seed=0, last=last)


def test_tucker_random_start_is_orth_of_unfolding_times_documented_gaussian():
    """V: the Gaussian drawn from the generator in x's layout with mode m of size r_m, i.e. V_(m)ᵀ."""
    shape, ranks = (3, 6, 5, 9), [2, 6, 3, 4]
    x = torch.randn(*shape, dtype=torch.float64)
    _, factors = tucker(x, ranks, generator=_gen(3))
    g = _gen(3)
    for mode, (n, r) in enumerate(zip(shape, ranks)):
        if r == n:  # identity modes draw nothing
            assert torch.equal(factors[mode], torch.eye(n, dtype=x.dtype))
            continue
        v = torch.randn(*shape[:mode], r, *shape[mode + 1:], generator=g).double()  # drawn in float32
        expected = orth(_ref_unfold(x, mode) @ _ref_unfold(v, mode).T)
        torch.testing.assert_close(factors[mode], expected)


def test_tucker_full_rank_modes_are_identity_without_qr(monkeypatch):
    """One QR per compressed mode; modes with r_m = n_m get U_m = I and the core keeps them as they are."""
    calls = []
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda m, mode="reduced": calls.append(m.shape) or qr(m, mode=mode))
    x = torch.randn(4, 6, 5, 9, dtype=torch.float64)
    core, factors = tucker(x, [4, 3, 5, 2], generator=_gen())
    assert calls == [(6, 3), (9, 2)]
    assert torch.equal(factors[0], torch.eye(4, dtype=x.dtype)) and torch.equal(factors[2], torch.eye(5, dtype=x.dtype))
    torch.testing.assert_close(core, _einsum_core(x, factors))
    calls.clear()
    tucker(x, [4, 3, 5, 2], prev=factors)
    assert calls == [(6, 3), (9, 2)]


def test_tucker_caps_rank_at_what_the_mode_can_hold():
    """r_m <= min(n_m, ∏_{j≠m} n_j): X_(3) of a (2, 5, 768) tensor has rank <= 10, so 768 directions
    (768×768 factor, 2.39 MB) would store 78× x's 30 KB; capped, every stored tensor is at most x's size."""
    x = torch.randn(2, 5, 768, generator=_gen(1))
    core, factors = tucker(x, [2, 5, 768], generator=_gen())
    assert [tuple(u.shape) for u in factors] == [(2, 2), (5, 5), (768, 10)] and core.shape == (2, 5, 10)
    nbytes = (core.numel() + sum(u.numel() for u in factors)) * 4
    dense = x.numel() * 4
    assert nbytes == (2 * 5 * 10 + 2 * 2 + 5 * 5 + 768 * 10) * 4  # = dense + core + the two identities
    assert all(t.numel() <= x.numel() for t in (core, *factors)) and nbytes < 1.02 * dense
    x64 = x.double()  # lossless: U_3 spans all of X_(3)'s 10 columns (float64: one random-start step, no error)
    core, factors = tucker(x64, [2, 5, 768], generator=_gen())
    torch.testing.assert_close(tucker_reconstruct(core, factors), x64)
    core, factors = tucker(x64, [2, 5, 768], prev=factors)  # the capped factor warm-starts
    assert factors[2].shape == (768, 10)
    torch.testing.assert_close(tucker_reconstruct(core, factors), x64)


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 3, 4, 6)])
def test_tucker_weight_grad_equals_unfolding_formula(shape):
    from wasi.functional import tucker_weight_grad
    x = torch.randn(*shape, dtype=torch.float64)
    dy = torch.randn(*shape[:-1], 4, dtype=torch.float64)
    ranks = [shape[0], 2] + [3] * (len(shape) - 2)  # the batch mode full: identity, skipped
    core, factors = tucker(x, ranks, generator=_gen())
    identity = [u.shape[0] == u.shape[1] for u in factors]
    assert identity[0] and not any(identity[1:])
    g, p = tucker_weight_grad(dy, core, factors, identity)
    assert p is factors[-1]
    torch.testing.assert_close(g, _ref_weight_grad(dy, core, factors))
    torch.testing.assert_close(tucker_weight_grad(dy, core, factors)[0], g)
    x_hat = tucker_reconstruct(core, factors)
    torch.testing.assert_close(g @ p.T, dy.reshape(-1, 4).T @ x_hat.reshape(-1, shape[-1]))


def test_tucker_and_weight_grad_make_no_copies():
    """Mode contractions on views: no aten::copy_/clone outside QR for a contiguous input."""
    from torch.profiler import ProfilerActivity, profile

    from wasi.functional import tucker_weight_grad
    x = torch.randn(4, 6, 5, 9)
    dy = torch.randn(4, 6, 5, 7)
    _, prev = tucker(x, [2, 3, 4, 2], generator=_gen())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        core, factors = tucker(x, [2, 3, 4, 2], prev=prev)
        tucker_weight_grad(dy, core, factors)
        tucker(x, [2, 3, 4, 2], generator=_gen())

    def under_qr(e) -> bool:
        while e is not None:
            if e.name == "aten::linalg_qr":
                return True
            e = e.cpu_parent
        return False

    copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone") and not under_qr(e)]
    assert copies == []


def test_svd_falls_back_to_float64_when_float32_does_not_converge(monkeypatch):
    """LAPACK may fail on a float32 matrix with many repeated singular values (seen on a pretrained-like
    spectrum at 1 thread); the float64 retry gives the same factorisation, returned in float32."""
    real_svd = torch.linalg.svd
    calls = []

    def flaky(m, **kwargs):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(m, **kwargs)

    m = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    u, s, vh = wasi.subspace.svd(m)
    assert calls == [torch.float32, torch.float64]
    assert u.dtype == s.dtype == vh.dtype == torch.float32 and u.shape == (12, 7) and vh.shape == (7, 7)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, m, atol=1e-5, rtol=1e-5)
    L, R = wasi.layers.low_rank_factors(m, 1.0)  # the layers' init goes through it too
    torch.testing.assert_close(L @ R, m, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,ranks", [((32, 50, 3072), (9, 4, 8)), ((32, 50, 768), (7, 4, 4)),
                                         ((4, 6, 5, 9), (2, 3, 4, 2))])
def test_cheapest_order_takes_fewest_flops_counted_by_torch(shape, ranks):
    """Every order of the core's mode products, FLOPs counted by torch.utils.flop_counter: the chosen order's
    count is the smallest, and the core is the same in any order."""
    import itertools

    from torch.utils.flop_counter import FlopCounterMode

    from wasi.subspace import cheapest_order, mode_product
    x = torch.randn(*shape)
    factors = [orth(torch.randn(n, r)) for n, r in zip(shape, ranks)]
    flops, cores = {}, {}
    for order in itertools.permutations(range(len(shape))):
        with FlopCounterMode(display=False) as counter:
            z = x
            for m in order:
                z = mode_product(z, factors[m].T, m)
        flops[order], cores[order] = counter.get_total_flops(), z
    best = tuple(cheapest_order(shape, ranks, range(len(shape))))
    assert flops[best] == min(flops.values())
    for core in cores.values():
        torch.testing.assert_close(core, cores[best], atol=1e-4, rtol=1e-4)


def test_seeded_normal_is_a_deterministic_standard_normal():
    """A pure function of (seed, stream, index): the same numbers for an int or a tensor seed, other numbers for
    another seed or stream, standard-normal moments and Kolmogorov-Smirnov distance (scipy), global RNG untouched."""
    from scipy import stats

    from wasi.subspace import seeded_normal
    state = torch.get_rng_state()
    z = seeded_normal((400, 501), 7, 2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(z, seeded_normal((400, 501), torch.tensor(7), 2))
    for other in (seeded_normal((400, 501), 8, 2), seeded_normal((400, 501), 7, 3)):
        assert abs(float(torch.corrcoef(torch.stack([z.flatten(), other.flatten()]))[0, 1])) < 0.01
    flat = z.flatten().double()
    assert abs(float(flat.mean())) < 0.01 and abs(float(flat.std()) - 1) < 0.01
    assert abs(float((flat ** 4).mean()) - 3) < 0.05
    assert stats.kstest(flat.numpy(), "norm").statistic < 0.005


def test_seeded_normal_compiles_to_the_same_numbers():
    import torch._dynamo as dynamo

    from wasi.subspace import seeded_normal
    dynamo.reset()
    compiled = torch.compile(lambda s: seeded_normal((9, 13), s, 1), backend="aot_eager", fullgraph=True)
    for seed in (0, 5):
        torch.testing.assert_close(compiled(torch.tensor(seed)), seeded_normal((9, 13), seed, 1))
    dynamo.reset()


def test_tucker_seeded_start_is_orth_of_unfolding_times_seeded_normal():
    """With `seed`, V_(m)ᵀ is seeded_normal(x's shape with mode m of size r_m, seed, stream m)."""
    from wasi.subspace import seeded_normal
    shape, ranks = (3, 6, 5, 9), [2, 6, 3, 4]
    x = torch.randn(*shape, dtype=torch.float64)
    _, factors = tucker(x, ranks, seed=11)
    for mode, (n, r) in enumerate(zip(shape, ranks)):
        if r == n:
            continue
        v = seeded_normal((*shape[:mode], r, *shape[mode + 1:]), 11, mode).double()
        torch.testing.assert_close(factors[mode], orth(_ref_unfold(x, mode) @ _ref_unfold(v, mode).T))
    _, again = tucker(x, ranks, seed=torch.tensor(11))
    assert all(torch.equal(a, b) for a, b in zip(factors, again))
