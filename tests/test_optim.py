"""SubspaceSGD and clip_grad_norm_ against dense formulas, torch.optim.SGD and torch's clipping."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wasi import SubspaceSGD, WASILinear, WSILinear, clip_grad_norm_, orth
from wasi.optim import factored_sq_norm

I, H, C = 12, 16, 3  # features, hidden, classes


class Net(nn.Module):
    """Token MLP + head: x (B, N, I) -> logits (B, C)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(I, H), nn.Linear(H, I), nn.Linear(I, C)

    def forward(self, x):
        return self.head(self.fc2(F.gelu(self.fc1(x))).mean(1))


def _dense(seed=0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _convert(net: Net, make) -> Net:
    net = copy.deepcopy(net)
    net.fc1, net.fc2 = make(net.fc1), make(net.fc2)
    return net


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 5, I, generator=g), torch.randint(0, C, (3,), generator=g)) for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_factored_step_equals_dense_formula():
    lr, wd = 0.1, 0.05
    model = _convert(_dense(), lambda l: WASILinear.from_linear(l, 0.6, [2, 3, 4]))
    opt = SubspaceSGD(model, lr, weight_decay=wd)
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    layer = model.fc1
    L, R = layer.L.detach().clone(), layer.R.detach().clone()
    g, p = layer.factored_grad
    w_new = (1 - lr * wd) * L @ R - lr * g @ p.T  # materialised W' (docs/method.md, Weight subspace (WSI))
    l_ref = orth(w_new @ (w_new.T @ L))
    r_ref = l_ref.T @ w_new
    bias_ref = layer.bias.detach() - lr * (layer.bias.grad + wd * layer.bias.detach())
    opt.step()
    torch.testing.assert_close(layer.L @ layer.R, l_ref @ r_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.L.abs(), l_ref.abs(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.L.T @ layer.L, torch.eye(layer.rank), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.bias, bias_ref)


def test_factored_matches_reference_mode_after_steps():
    dense, batches = _dense(), _batches(5)
    models = [_convert(dense, lambda l, u=u: WASILinear.from_linear(l, 0.6, [2, 3, 4], weight_update=u))
              for u in ("factored", "reference")]
    for m in models:
        _train(m, SubspaceSGD(m, 0.05, weight_decay=0.01), batches)
    fact, ref = models
    for name in ("fc1", "fc2"):
        lf, lr_ = getattr(fact, name), getattr(ref, name)
        assert lf.rank == lr_.rank < min(lf.in_features, lf.out_features)
        torch.testing.assert_close(lf.L @ lf.R, lr_.weight.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lf.L @ lf.R, lr_.L @ lr_.R, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lf.bias, lr_.bias, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fact.head.weight, ref.head.weight, atol=1e-6, rtol=1e-5)


def test_factored_momentum_is_dense_momentum_when_subspace_is_full():
    """K = O: span(L) is all of R^O, so the projected buffer C (K, I) carries the whole dense momentum."""
    torch.manual_seed(0)
    linear = nn.Linear(H, I)  # O = 12 <= I = 16; epsilon 1 gives K = 12
    models = [nn.Sequential(WASILinear.from_linear(linear, 1.0, [2, 3, 4], weight_update=u))
              for u in ("factored", "reference")]
    xs = [torch.randn(3, 5, H, generator=torch.Generator().manual_seed(s)) for s in range(5)]
    for m in models:
        opt = SubspaceSGD(m, 0.05, weight_decay=0.01, momentum=0.9)
        for x in xs:
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    fact, ref = models[0][0], models[1][0]
    assert fact.rank == I
    torch.testing.assert_close(fact.L @ fact.R, ref.weight.detach(), atol=1e-5, rtol=1e-4)


def test_plain_parameters_follow_torch_sgd():
    a, b = _dense(), _dense()
    batches = _batches(3)
    _train(a, SubspaceSGD(a, 0.1, weight_decay=0.01, momentum=0.9), batches)
    _train(b, torch.optim.SGD(b.parameters(), 0.1, weight_decay=0.01, momentum=0.9), batches)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def _wasi_net() -> Net:
    return _convert(_dense(), lambda l: WASILinear.from_linear(l, 0.6, [2, 3, 4]))


def test_param_groups_and_lr_scheduler():
    model = _wasi_net()
    model.fc1.bias.requires_grad_(False)
    opt = SubspaceSGD(model, 0.1)
    assert len(opt.param_groups) == 3  # ordinary params, then [L, R] of fc1 and of fc2
    assert opt.param_groups[1]["params"] == [model.fc1.L, model.fc1.R]
    assert all(p is not model.fc1.bias for p in opt.param_groups[0]["params"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, _batches(1))
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.05] * 3


def test_no_dense_weight_tensor_in_factored_layers():
    model, batches = _wasi_net(), _batches(4)
    opt = SubspaceSGD(model, 0.05, weight_decay=0.01, momentum=0.9)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        clip_grad_norm_(model, 1.0)
        opt.step()
    for layer in (model.fc1, model.fc2):
        o, i = layer.out_features, layer.in_features
        assert layer.rank * max(o, i) < o * i
        tensors = [*layer.parameters(), *layer.buffers(), *layer.state_dict().values(), *layer.factored_grad]
        tensors += [t for p in layer.parameters() for t in opt.state[p].values()]
        tensors += [p.grad for p in layer.parameters() if p.grad is not None]
        assert all(t.numel() < o * i for t in tensors), [tuple(t.shape) for t in tensors]
        assert layer.L.grad is None and layer.R.grad is None
        assert opt.state[layer.R]["momentum_buffer"].shape == layer.R.shape
    opt.zero_grad()
    assert model.fc1.factored_grad is None and model.fc2.factored_grad is None


def test_clip_grad_norm_equals_dense_autograd_norm():
    """fc1: WSI with truncated K (P = tokens, not orthonormal); fc2: WASI with full activation ranks
    (P orthonormal). The dense twin has W = L R, so all its autograd grads are the same gradients."""
    dense = _dense()
    model = copy.deepcopy(dense)
    model.fc1 = WSILinear.from_linear(dense.fc1, 0.6)
    model.fc2 = WASILinear.from_linear(dense.fc2, 0.6, [3, 5, H])
    with torch.no_grad():
        dense.fc1.weight.copy_(model.fc1.L @ model.fc1.R)
        dense.fc2.weight.copy_(model.fc2.L @ model.fc2.R)
    x, y = _batches(1)[0]
    for m in (model, dense):
        F.cross_entropy(m(x), y).backward()
    total = clip_grad_norm_(model, 0.05)
    total_ref = torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.05)
    assert total > 0.05
    torch.testing.assert_close(total, total_ref, atol=1e-6, rtol=1e-5)
    for name in ("fc1", "fc2"):
        g, p = getattr(model, name).factored_grad
        torch.testing.assert_close(g @ p.T, getattr(dense, name).weight.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(getattr(model, name).bias.grad, getattr(dense, name).bias.grad)
    torch.testing.assert_close(model.head.weight.grad, dense.head.weight.grad)


@pytest.mark.parametrize("r", [2, 40])  # Gram path, and row blocks of G Pᵀ when r (O + I) > O I
def test_factored_sq_norm_any_p(r):
    g, p = torch.randn(6, r), torch.randn(5, r)
    torch.testing.assert_close(factored_sq_norm(g, p), (g @ p.T).square().sum(), rtol=1e-5, atol=1e-5)


def test_dense_factor_grads_without_factored_grad_raise():
    model = _wasi_net()
    opt = SubspaceSGD(model, 0.1)
    model.eval()  # plain F.linear path: autograd writes L.grad/R.grad, the factored backward never ran
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="model.train"):
        opt.step()



def _truncated_svd(w: torch.Tensor, eps: float) -> tuple[int, torch.Tensor]:
    """Independent rank-K truncation: K is the first index where the cumulative σ² share reaches eps."""
    u, s, vh = torch.linalg.svd(w.double())
    share = (s.square().cumsum(0) / s.square().sum()).tolist()
    k = next(i + 1 for i, c in enumerate(share) if c >= eps)
    return k, (u[:, :k] * s[:k]) @ vh[:k]


def test_svd_mode_step_is_truncated_svd_of_dense_sgd_step():
    """fc1: WSI (dense saved input), fc2: WASI with full activation ranks, so a dense twin with weight L R
    has the layers' ∇W as its autograd gradient. The svd mode keeps the full W and steps it to
    W' = (1-ηλ) W − η ∇W; L R must be the rank-K truncated SVD of W' at ε."""
    lr, wd, eps = 0.5, 0.1, 0.6
    full = _dense()
    model = copy.deepcopy(full)
    model.fc1 = WSILinear.from_linear(full.fc1, eps, weight_update="svd")
    model.fc2 = WASILinear.from_linear(full.fc2, eps, [3, 5, H], weight_update="svd")
    twin = copy.deepcopy(full)
    with torch.no_grad():
        twin.fc1.weight.copy_(model.fc1.L @ model.fc1.R)
        twin.fc2.weight.copy_(model.fc2.L @ model.fc2.R)
    x, y = _batches(1)[0]
    F.cross_entropy(twin(x), y).backward()
    opt = SubspaceSGD(model, lr, weight_decay=wd)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for name in ("fc1", "fc2"):
        layer, w, grad = getattr(model, name), getattr(full, name).weight.detach(), getattr(twin, name).weight.grad
        w_new = (1 - lr * wd) * w - lr * grad
        k, w_ref = _truncated_svd(w_new, eps)
        assert layer.rank == k and layer.L.shape == (layer.out_features, k) and layer.R.shape == (k, layer.in_features)
        torch.testing.assert_close(layer.L @ layer.R, w_ref.float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.weight.detach(), w_new, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.L.T @ layer.L, torch.eye(k), atol=1e-5, rtol=0)


@pytest.mark.parametrize("eps,k0,k1", [(0.3, 1, 1), (0.8, 2, 3), (0.95, 3, 4)])
def test_svd_mode_rank_follows_epsilon_of_known_spectrum(eps, k0, k1):
    """W = diag(4, 2, 1, 1): σ² shares .73, .91, .95, 1 give K0. A gradient step adding diag(0, 0, 1.5, 3.5)
    to the full W gives W' = diag(4, 2, 2.5, 4.5), σ² 20.25, 16, 6.25, 4 (shares .44, .78, .91, 1) -> K1,
    and L R keeps the K1 largest diagonal entries. The reference mode (W = L R, one iteration) keeps K0."""
    w0, w1 = torch.tensor([4.0, 2.0, 1.0, 1.0]), torch.tensor([4.0, 2.0, 2.5, 4.5])
    linear = nn.Linear(4, 4)
    with torch.no_grad():
        linear.weight.copy_(torch.diag(w0))
    x = torch.eye(4)[2:].unsqueeze(0)  # tokens e_2, e_3: (1, 2, 4)
    push = torch.tensor([[[0, 0, 1.5, 0], [0, 0, 0, 3.5]]])  # -∂loss/∂y, so ∇W = -diag(0, 0, 1.5, 3.5)
    layers = {u: WSILinear.from_linear(linear, eps, weight_update=u) for u in ("svd", "reference")}
    for layer in layers.values():
        assert layer.rank == k0
        opt = SubspaceSGD(layer, lr=1.0)
        (-(layer(x) * push).sum()).backward()
        opt.step()
    assert {u: l.rank for u, l in layers.items()} == {"svd": k1, "reference": k0}
    keep = w1.argsort(descending=True)[:k1]
    expected = torch.diag(torch.zeros(4).index_copy(0, keep, w1[keep]))
    torch.testing.assert_close(layers["svd"].L @ layers["svd"].R, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layers["svd"].weight.detach(), torch.diag(w1))


def test_svd_mode_needs_epsilon():
    with pytest.raises(ValueError, match="epsilon"):
        WSILinear(torch.eye(3, 2), torch.ones(2, 3), None, weight_update="svd")


def _subspace_problem(o, i, k, r, seed=0, spread=1.0, dtype=torch.float64):
    """L: (O, K) orthonormal, A: (K, I) with singular values from `spread` down to 1, G: (O, r), P: (I, r)."""
    g = torch.Generator().manual_seed(seed)
    L = torch.linalg.qr(torch.randn(o, k, generator=g, dtype=dtype)).Q
    u, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=dtype))
    v, _ = torch.linalg.qr(torch.randn(i, k, generator=g, dtype=dtype))
    s = torch.logspace(0, -torch.log10(torch.tensor(spread)).item(), k, dtype=dtype) * spread
    A = (u * s) @ v.T
    return L, A, torch.randn(o, r, generator=g, dtype=dtype), torch.randn(i, r, generator=g, dtype=dtype)


def _dense_subspace_step(L, A, G, P, lr):
    """The materialised formulas: W' = L A − η G Pᵀ, L' = orth(W' W'ᵀ L), float64 Householder QR."""
    w = L @ A - lr * G @ P.T
    new_l = torch.linalg.qr((w @ (w.T @ L)).double()).Q.to(L.dtype)
    return new_l, w


@pytest.mark.parametrize("o,i,k,r", [(40, 12, 6, 3), (12, 40, 6, 6), (30, 30, 9, 1)])  # fc1-, fc2-like, r = 1
def test_subspace_step_cholesky_qr_equals_householder_formula(o, i, k, r):
    from wasi.optim import subspace_step
    lr = 0.3
    L, A, G, P = _subspace_problem(o, i, k, r, dtype=torch.float32)
    new_l, ltl, ltg, cholesky = subspace_step(L, A, G, P, lr)
    assert cholesky
    ref, w = _dense_subspace_step(L.double(), A.double(), G.double(), P.double(), lr)
    signs = torch.sign((new_l.double() * ref).sum(0))  # QR's column signs are a convention
    torch.testing.assert_close(new_l.double() * signs, ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(new_l.T @ new_l, torch.eye(k), atol=2e-6, rtol=0)
    torch.testing.assert_close(ltl, new_l.T @ L, atol=2e-6, rtol=0)
    torch.testing.assert_close(ltg, new_l.T @ G, atol=2e-5, rtol=1e-5)
    r_new = ltl @ A - lr * ltg @ P.T  # R' = L'ᵀ W'
    torch.testing.assert_close(new_l.double() @ r_new.double(), ref @ (ref.T @ w), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("spread,cholesky", [(1e2, True), (1e3, False)])
def test_subspace_step_ill_conditioned_weight_keeps_orthonormality(spread, cholesky):
    """κ(A) = 1e2 gives κ(W'Q) ≈ 1e4: a Cholesky-QR of W'Q formed in float32 would lose all orthogonality (its
    Gram has κ ≈ 1e8 > 1/ε₃₂), the float64 Gram of the (K + r)-dim coordinates keeps L' orthonormal. At κ(A) =
    1e3 (κ(W'Q) ≈ 1e6, where even float64 loses 1e-4) the step takes Householder QR instead."""
    from wasi.optim import subspace_step
    L, A, G, P = _subspace_problem(60, 20, 8, 2, spread=spread, dtype=torch.float32)
    new_l, _, _, used = subspace_step(L, A, G * 1e-3, P, 0.1)
    assert used == cholesky
    torch.testing.assert_close(new_l.T @ new_l, torch.eye(8), atol=2e-6, rtol=0)
    ref, _ = _dense_subspace_step(L.double(), A.double(), (G * 1e-3).double(), P.double(), 0.1)
    top = slice(0, 4)  # directions whose σ(W'Q) is within 1e3 of the largest, well above float32 noise
    torch.testing.assert_close((new_l.double() @ new_l.double().T) @ ref[:, top], ref[:, top], atol=1e-4, rtol=0)


def test_subspace_step_falls_back_to_householder_when_rank_deficient():
    """A has a zero row and G lies in span(L) away from it, so W' = L A'' has rank K − 1, W'Q is rank-deficient
    and its Gram singular: Householder QR, still orthonormal, and L' R' = W' (W' lies in span L')."""
    from wasi.optim import subspace_step
    L, A, _, P = _subspace_problem(30, 20, 6, 1, dtype=torch.float32)
    A[-1] = 0
    G = L[:, :1].clone()
    new_l, ltl, ltg, cholesky = subspace_step(L, A, G, P, 0.2)
    assert not cholesky
    torch.testing.assert_close(new_l.T @ new_l, torch.eye(6), atol=1e-6, rtol=0)
    w = L @ A - 0.2 * G @ P.T
    torch.testing.assert_close(new_l @ (ltl @ A - 0.2 * ltg @ P.T), w, atol=1e-6, rtol=1e-5)


def test_subspace_step_many_columns_uses_householder():
    """r > K (a dense saved input has one column per token): the (O, K) matrix W'Q is formed and QR'd."""
    from wasi.optim import subspace_step
    L, A, G, P = _subspace_problem(30, 20, 4, 9, dtype=torch.float32)
    new_l, _, _, cholesky = subspace_step(L, A, G, P, 0.1)
    assert not cholesky
    ref, _ = _dense_subspace_step(L.double(), A.double(), G.double(), P.double(), 0.1)
    cosines = (new_l.double() * ref).sum(0).abs()  # the same columns up to sign
    torch.testing.assert_close(cosines, torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0)


def test_subspace_step_many_columns_costs_no_r_by_r_product():
    """WSI's exact gradient has one column per token (r = B·N ≫ K): the step's multiply-adds are linear in r,
    counted by hand: C = LᵀG, Q = Aᵀ − η P Cᵀ, X = A Q, Y = PᵀQ, W'Q = L X − η G Y, L'ᵀL and L'ᵀG (QR uncounted).
    Also with a decay `scale`, against the materialised formulas."""
    from experiments.measurement.metrics import flop_counter
    from wasi.optim import subspace_step
    o, i, k, r = 48, 16, 4, 300
    L, A, G, P = _subspace_problem(o, i, k, r, dtype=torch.float64)
    counter = flop_counter()
    with counter:
        new_l, _, _, cholesky = subspace_step(L, A, G, P, 0.1, scale=0.9)
    assert not cholesky
    assert counter.get_total_flops() == 2 * (3 * k * o * r + 2 * i * r * k + k * k * i + 2 * o * k * k)
    ref, _ = _dense_subspace_step(L, 0.9 * A, G, P, 0.1)
    torch.testing.assert_close((new_l * ref).sum(0).abs(), torch.ones(k, dtype=torch.float64), atol=1e-9, rtol=0)


def test_reorthonormalise_restores_orthonormal_columns_and_keeps_w():
    from wasi.optim import reorthonormalise
    L, A, _, _ = _subspace_problem(30, 20, 5, 1, dtype=torch.float32)
    C = torch.randn(5, 20)
    same = reorthonormalise(L, A, C)
    assert same[0] is L and same[1] is A and same[2] is C  # within tolerance: nothing to do
    drifted = L * torch.tensor([1 + 1e-3, 1, 1, 1, 1 - 1e-3]) + 1e-4 * torch.randn(30, 5)
    q, r, c = reorthonormalise(drifted, A, C)
    torch.testing.assert_close(q.T @ q, torch.eye(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(q @ r, drifted @ A, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q @ c, drifted @ C, atol=1e-5, rtol=1e-5)


def test_optimizer_re_orthonormalises_drifted_factors(monkeypatch):
    """Every DRIFT_CHECK_EVERY-th Cholesky-QR step checks the column norms of L; a layer whose L has drifted
    (here by hand, 1e-3) comes out orthonormal, with the same W as the undrifted twin's step."""
    import wasi.optim
    monkeypatch.setattr(wasi.optim, "DRIFT_CHECK_EVERY", 1)
    model = _wasi_net()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        d = torch.ones(model.fc1.rank)
        d[0] = 1 + 1e-3
        model.fc1.L.mul_(d)
        model.fc1.R.div_(d[:, None])  # same W = L R, no longer an orthonormal L
    x, y = _batches(1)[0]
    for m in (model, twin):
        opt = SubspaceSGD(m, 0.05)
        F.cross_entropy(m(x), y).backward()
        opt.step()
    L = model.fc1.L.detach()
    torch.testing.assert_close(L.T @ L, torch.eye(model.fc1.rank), atol=1e-6, rtol=0)
    torch.testing.assert_close(L @ model.fc1.R, twin.fc1.L @ twin.fc1.R, atol=1e-4, rtol=1e-3)


def test_drift_checks_follow_a_resumed_optimizer(monkeypatch):
    """The Cholesky-QR steps counted towards the next drift check are optimizer state: an optimizer loaded from
    another's state_dict after 2 steps checks at the same step (the 3rd) as the one that took them."""
    import wasi.optim
    monkeypatch.setattr(wasi.optim, "DRIFT_CHECK_EVERY", 3)
    checks: list[str] = []
    check = wasi.optim.reorthonormalise
    monkeypatch.setattr(wasi.optim, "reorthonormalise", lambda *a, **k: checks.append("check") or check(*a, **k))
    model = _wasi_net()
    opt = SubspaceSGD(model, 0.05, momentum=0.9)
    data = _batches(3)

    def step(m, o, batch):
        o.zero_grad()
        F.cross_entropy(m(batch[0]), batch[1]).backward()
        o.step()

    for batch in data[:2]:
        step(model, opt, batch)
    assert not checks
    resumed = copy.deepcopy(model)
    resumed_opt = SubspaceSGD(resumed, 0.05, momentum=0.9)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    step(resumed, resumed_opt, data[2])
    assert checks == ["check"] * len(wasi.factored_layers(model))


def test_cpu_factors_take_the_steps_results_without_a_copy_and_equal_copied_ones(monkeypatch):
    """On the CPU the step hands L and R the storage of its results (`set_`) instead of copying into the old one:
    the same Parameter objects (optimizer state, param groups and the module still hold them), new storage, and
    bit for bit the values of copying in place over momentum steps and a drift re-orthonormalisation."""
    import wasi.optim
    monkeypatch.setattr(wasi.optim, "DRIFT_CHECK_EVERY", 2)
    model = _convert(_dense(), lambda l: WASILinear.from_linear(l, 0.6, [2, 3, 4]))
    copied = copy.deepcopy(model)
    params, ptrs = [model.fc1.L, model.fc1.R], [t.data_ptr() for t in (model.fc1.L, model.fc1.R)]
    opt = SubspaceSGD(model, 0.1, weight_decay=0.01, momentum=0.9)
    _train(model, opt, _batches(3))
    assert [model.fc1.L, model.fc1.R] == params and opt.param_groups[-2]["params"] == params
    assert all(t.data_ptr() != p for t, p in zip(params, ptrs))
    monkeypatch.setattr(wasi.optim, "_store", lambda param, value: param.copy_(value))
    _train(copied, SubspaceSGD(copied, 0.1, weight_decay=0.01, momentum=0.9), _batches(3))
    for name in ("fc1", "fc2"):
        for f in ("L", "R"):
            assert torch.equal(getattr(getattr(model, name), f), getattr(getattr(copied, name), f))


def test_factors_in_shared_memory_are_updated_in_place():
    """After model.share_memory() (several processes training one model) the step writes into the shared storage."""
    model = _convert(_dense(), lambda l: WASILinear.from_linear(l, 0.6, [2, 3, 4])).share_memory()
    ptrs = [t.data_ptr() for t in (model.fc1.L, model.fc1.R)]
    before = model.fc1.L.detach().clone()
    _train(model, SubspaceSGD(model, 0.1), _batches(1))
    assert [t.data_ptr() for t in (model.fc1.L, model.fc1.R)] == ptrs and model.fc1.L.is_shared()
    assert not torch.equal(model.fc1.L, before)


def test_next_row_gram_is_the_gram_of_the_new_r():
    """R' R'ᵀ from A Aᵀ and small products, for R' = M A − η N Pᵀ (float64, exact up to rounding)."""
    from wasi.optim import next_row_gram
    g = torch.Generator().manual_seed(0)
    k, i, r, lr = 5, 40, 3, 0.3
    m, a, n, p = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((k, k), (k, i), (k, r), (i, r)))
    new_r = m @ a - lr * n @ p.T
    carried = next_row_gram(a @ a.T, m, n, a @ p, p.T @ p, lr)
    torch.testing.assert_close(carried, new_r @ new_r.T, atol=1e-12, rtol=1e-12)


class WideNet(Net):
    """As Net with a 64-wide hidden layer: fc2's R is (K, 64), so it keeps R Rᵀ (`keeps_row_gram`)."""

    def __init__(self):
        nn.Module.__init__(self)
        self.fc1, self.fc2, self.head = nn.Linear(I, 64), nn.Linear(64, I), nn.Linear(I, C)


def _wide_wasi(seed=0) -> Net:
    torch.manual_seed(seed)
    return _convert(WideNet(), lambda l: WASILinear.from_linear(l, 0.7, [2, 3, 4]))


def test_kept_row_gram_steps_equal_steps_that_form_it(monkeypatch):
    """Steps that carry R Rᵀ over (`next_row_gram`) take the weights the steps forming it afresh take, to float
    rounding, over 10 steps with weight decay and a refresh every 4th; the kept Gram stays R Rᵀ."""
    import wasi.optim
    monkeypatch.setattr(wasi.optim, "ROW_GRAM_REFRESH_EVERY", 4)
    kept, formed, batches = _wide_wasi(), _wide_wasi(), _batches(10)
    assert wasi.optim.keeps_row_gram(*kept.fc2.R.shape) and not wasi.optim.keeps_row_gram(*kept.fc1.R.shape)
    opt = SubspaceSGD(kept, 0.05, weight_decay=0.01)
    for batch in batches:
        _train(kept, opt, [batch])
        gram = opt.state[kept.fc2.R]["row_gram"]
        torch.testing.assert_close(gram, kept.fc2.R @ kept.fc2.R.T, atol=1e-5, rtol=1e-5)
    assert "row_gram" not in opt.state[kept.fc1.R]
    monkeypatch.setattr(wasi.optim, "keeps_row_gram", lambda k, i: False)
    _train(formed, SubspaceSGD(formed, 0.05, weight_decay=0.01), batches)
    for name in ("fc1", "fc2"):
        a, b = getattr(kept, name), getattr(formed, name)
        torch.testing.assert_close(a.L @ a.R, b.L @ b.R, atol=1e-6, rtol=1e-5)


def test_row_gram_is_formed_afresh_when_due_or_when_r_changed(monkeypatch):
    """A kept Gram that is wrong is never used at a refresh step (every step here), nor after R changed in place:
    both steps equal, bit for bit, those of an optimizer that always forms R Rᵀ."""
    import wasi.optim
    fresh_rule = lambda k, i: False  # noqa: E731
    for refresh_every, edit in ((1, False), (100, True)):
        monkeypatch.setattr(wasi.optim, "ROW_GRAM_REFRESH_EVERY", refresh_every)
        monkeypatch.setattr(wasi.optim, "next_row_gram", lambda gram, *args: torch.zeros_like(gram))
        kept, formed = _wide_wasi(), _wide_wasi()
        opts = [SubspaceSGD(m, 0.05, weight_decay=0.01) for m in (kept, formed)]
        for batch in _batches(3):
            for model, opt, rule in ((kept, opts[0], wasi.optim.keeps_row_gram), (formed, opts[1], fresh_rule)):
                with monkeypatch.context() as m:
                    if rule is fresh_rule:
                        m.setattr(wasi.optim, "keeps_row_gram", rule)
                    if edit:
                        with torch.no_grad():
                            model.fc2.R.mul_(1.5)
                    _train(model, opt, [batch])
            assert torch.equal(kept.fc2.R, formed.fc2.R) and torch.equal(kept.fc2.L, formed.fc2.L)


def test_kept_row_gram_follows_a_resumed_optimizer():
    """An optimizer loaded from `state_dict()` (model first) carries on with the kept Gram and the refresh count:
    bit for bit the weights of the uninterrupted one."""
    model, batches = _wide_wasi(), _batches(6)
    opt = SubspaceSGD(model, 0.05, weight_decay=0.01)
    _train(model, opt, batches[:3])
    resumed = copy.deepcopy(model)
    resumed_opt = SubspaceSGD(resumed, 0.05, weight_decay=0.01)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert "row_gram" in resumed_opt.state[resumed.fc2.R]
    _train(model, opt, batches[3:])
    _train(resumed, resumed_opt, batches[3:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def test_momentum_keeps_no_row_gram():
    model = _wide_wasi()
    opt = SubspaceSGD(model, 0.05, momentum=0.9)
    _train(model, opt, _batches(2))
    assert all("row_gram" not in opt.state[layer.R] for layer in (model.fc1, model.fc2))


def test_re_orthonormalisation_drops_the_kept_row_gram(monkeypatch):
    """R ← T R when L is re-orthonormalised: that step keeps no R Rᵀ, and the next forms it afresh."""
    import wasi.optim
    monkeypatch.setattr(wasi.optim, "DRIFT_CHECK_EVERY", 1)
    model, batches = _wide_wasi(), _batches(3)
    opt = SubspaceSGD(model, 0.05, weight_decay=0.01)
    _train(model, opt, batches[:1])
    assert "row_gram" in opt.state[model.fc2.R]
    with torch.no_grad():
        model.fc2.L.mul_(1 + 1e-3)  # drifted columns: the next step's check re-orthonormalises
    _train(model, opt, batches[1:2])
    torch.testing.assert_close(model.fc2.L.T @ model.fc2.L, torch.eye(model.fc2.rank), atol=1e-6, rtol=0)
    assert "row_gram" not in opt.state[model.fc2.R]
    _train(model, opt, batches[2:])
    torch.testing.assert_close(opt.state[model.fc2.R]["row_gram"], model.fc2.R @ model.fc2.R.T, atol=1e-5, rtol=1e-5)


# --- the nearest basis (basis="nearest") ---


def _nearest_step_of(L, A, G, P, lr, scale=1.0, gram=None):
    from wasi.optim import _nearest_step
    before = L.clone()
    return before, _nearest_step(L, A, G, P, lr, scale, gram)


@pytest.mark.parametrize("o,i,k,r,kept", [(60, 24, 12, 3, False), (24, 60, 12, 2, True), (40, 40, 16, 1, False)])
def test_nearest_step_spans_what_the_qr_step_spans(o, i, k, r, kept):
    """The same new subspace (hence the same W' = L'R') as the materialised step, an orthonormal L' written into L,
    and the basis nearest the old L: L'ᵀL symmetric positive definite (the QR basis's is not)."""
    lr, scale = 0.3, 0.9
    L, A, G, P = _subspace_problem(o, i, k, r, dtype=torch.float32)
    before, step = _nearest_step_of(L, A, G, P, lr, scale, (A @ A.T) if kept else None)
    assert step.v is not None and step.L is L and step.drifts
    ref, w = _dense_subspace_step(before.double(), scale * A.double(), G.double(), P.double(), lr)
    torch.testing.assert_close(L.double() @ L.double().T, ref @ ref.T, atol=2e-5, rtol=0)
    torch.testing.assert_close(L.T @ L, torch.eye(k), atol=2e-6, rtol=0)
    ltl = L.T @ before
    torch.testing.assert_close(step.ltl_times(torch.eye(k)), ltl, atol=2e-6, rtol=0)
    torch.testing.assert_close(ltl, ltl.T, atol=2e-6, rtol=0)
    assert float(torch.linalg.eigvalsh(ltl.double()).min()) > 0
    qr_ltl = ref.T @ before.double()
    assert float((qr_ltl - qr_ltl.T).abs().max()) > 1e-3  # the QR basis is a different one
    torch.testing.assert_close(step.ltg, L.T @ G, atol=2e-5, rtol=1e-5)
    new_r = step.new_r(A.clone(), scale, P, lr)  # R' = L'ᵀ W'
    torch.testing.assert_close(L.double() @ new_r.double(), ref @ (ref.T @ w), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("spread,nearest", [(1e2, True), (1e3, True), (1e4, False)])
def test_nearest_step_of_an_ill_conditioned_weight(spread, nearest):
    """κ(A) = 1e2 and 1e3 (κ(B₁) ≈ 1e4, 1e6): the nearest basis, orthonormal, and the whole new subspace to 1e-5,
    where the QR basis at κ(A) = 1e3 (Householder QR of W'Q in float32) is off by 5e-3 in the weakest directions.
    κ(A) = 1e4: past NEAREST_MIN_PIVOT, the QR basis, and L is left as it was."""
    L, A, G, P = _subspace_problem(60, 20, 8, 2, spread=spread, dtype=torch.float32)
    before, step = _nearest_step_of(L, A, G * 1e-3, P, 0.1)
    assert (step.v is not None) == nearest
    torch.testing.assert_close(step.L.T @ step.L, torch.eye(8), atol=2e-6, rtol=0)
    if not nearest:
        assert torch.equal(L, before) and step.L is not L
        return
    ref, _ = _dense_subspace_step(before.double(), A.double(), (G * 1e-3).double(), P.double(), 0.1)
    torch.testing.assert_close(step.L.double() @ step.L.double().T, ref @ ref.T, atol=1e-5, rtol=0)


def test_nearest_step_costs_no_k_by_k_product_of_o_or_i():
    """The nearest basis's multiply-adds, counted by hand: linear in O and I (times K r), quadratic in K only in
    the small (K, K) products. Step: C = LᵀG, G − L C, A P, PᵀP, X, Y, B₁ = X − η C Y, R₂ Y, L'ᵀG (three products),
    L V, the turn's Q₂ (U sin θ), L += turn Vᵀ (QR, Cholesky, SVD uncounted). R': VᵀA and one product of inner
    size 2r. The carried R Rᵀ: H V, Vᵀ Z, Y, Vᵀ (A P), F (two), S."""
    from experiments.measurement.metrics import flop_counter
    o, i, k, r = 48, 40, 12, 3
    L, A, G, P = _subspace_problem(o, i, k, r, dtype=torch.float64)
    gram, counted = A @ A.T, []
    for part in ("step", "new_r", "gram"):
        counter = flop_counter()
        with counter:
            if part == "step":
                _, step = _nearest_step_of(L, A, G, P, 0.1, 0.9, gram)
            elif part == "new_r":
                step.new_r(A.clone(), 0.9, P, 0.1)
            else:
                step.next_row_gram(gram, 0.9, 0.1)
        counted.append(counter.get_total_flops())
    assert step.v is not None
    step_macs = (4 * o * k * r + i * r * k + i * r * r + 2 * k * k * r + 2 * r * r * k + 3 * k * r * r + r ** 3
                 + o * r * r)
    assert counted == [2 * step_macs, 2 * 3 * k * r * i, 2 * (3 * k * k * r + 5 * k * r * r)]


def test_next_row_gram_in_the_nearest_basis_is_the_gram_of_the_new_r():
    """R' R'ᵀ in O(K² r) for M = α (I − V diag(d) Vᵀ), against the dense formula (float64)."""
    from wasi.optim import _next_row_gram_nearest
    g = torch.Generator().manual_seed(0)
    k, i, r, lr, alpha = 9, 40, 3, 0.3, 0.95
    v = torch.linalg.qr(torch.randn(k, r, generator=g, dtype=torch.float64)).Q
    d = torch.rand(r, generator=g, dtype=torch.float64)
    a, n, p = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((k, i), (k, r), (i, r)))
    new_r = alpha * (a - v @ (d[:, None] * (v.T @ a))) - lr * n @ p.T
    carried = _next_row_gram_nearest(a @ a.T, alpha, v, d, n, a @ p, p.T @ p, lr)
    torch.testing.assert_close(carried, new_r @ new_r.T, atol=1e-12, rtol=1e-12)


class NearNet(Net):
    """16 features, 48 hidden: K = 10 at ε = 0.8 and gradient rank r = 2, so both layers take the nearest basis."""

    def __init__(self):
        nn.Module.__init__(self)
        self.fc1, self.fc2, self.head = nn.Linear(16, 48), nn.Linear(48, 16), nn.Linear(16, C)


def _near_wasi() -> Net:
    torch.manual_seed(0)
    return _convert(NearNet(), lambda l: WASILinear.from_linear(l, 0.8, [2, 3, 2]))


def _near_batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 5, 16, generator=g), torch.randint(0, C, (3,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_nearest_basis_trains_the_weights_of_the_qr_basis(momentum, monkeypatch):
    """10 steps with weight decay (and momentum): the same W = L R as the QR basis to float rounding, each step's L'ᵀL
    symmetric (the nearest basis), L updated in its own storage, and without momentum R too, and every layer keeps
    R Rᵀ (refreshed every 4th step here)."""
    import wasi.optim
    monkeypatch.setattr(wasi.optim, "ROW_GRAM_REFRESH_EVERY", 4)
    near, qr, batches = _near_wasi(), _near_wasi(), _near_batches(10)
    layers = (near.fc1, near.fc2)
    assert all(wasi.optim.takes_nearest_basis(l.rank, 2) for l in layers)
    opt = SubspaceSGD(near, 0.05, weight_decay=0.01, momentum=momentum, basis="nearest")
    ptrs = [(l.L.data_ptr(), l.R.data_ptr()) for l in layers]
    for batch in batches:
        before = [l.L.detach().clone() for l in layers]
        _train(near, opt, [batch])
        for layer, old in zip(layers, before):
            ltl = layer.L.T @ old
            torch.testing.assert_close(ltl, ltl.T, atol=1e-6, rtol=0)
            torch.testing.assert_close(layer.L.T @ layer.L, torch.eye(layer.rank), atol=2e-6, rtol=0)
            gram = opt.state[layer.R].get("row_gram")
            assert (gram is None) == bool(momentum)
            if gram is not None:
                torch.testing.assert_close(gram, layer.R @ layer.R.T, atol=1e-5, rtol=1e-5)
    assert [(l.L.data_ptr(), l.R.data_ptr()) for l in layers] == ptrs or momentum  # A = (1-ηλ)R − ημC: new
    assert [l.L.data_ptr() for l in layers] == [ptr for ptr, _ in ptrs]
    _train(qr, SubspaceSGD(qr, 0.05, weight_decay=0.01, momentum=momentum), batches)
    for name in ("fc1", "fc2"):
        a, b = getattr(near, name), getattr(qr, name)
        torch.testing.assert_close(a.L @ a.R, b.L @ b.R, atol=1e-6, rtol=1e-5)


def test_nearest_basis_resumes_bit_for_bit():
    model, batches = _near_wasi(), _near_batches(6)
    opt = SubspaceSGD(model, 0.05, weight_decay=0.01, basis="nearest")
    _train(model, opt, batches[:3])
    resumed = copy.deepcopy(model)
    resumed_opt = SubspaceSGD(resumed, 0.05, weight_decay=0.01, basis="nearest")
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(model, opt, batches[3:])
    _train(resumed, resumed_opt, batches[3:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def test_nearest_basis_re_orthonormalises_a_drifted_l(monkeypatch):
    import wasi.optim
    monkeypatch.setattr(wasi.optim, "DRIFT_CHECK_EVERY", 1)
    model = _near_wasi()
    opt = SubspaceSGD(model, 0.05, basis="nearest")
    with torch.no_grad():
        model.fc1.L.mul_(1 + 1e-3)
    w = model.fc1.L @ model.fc1.R
    _train(model, opt, _near_batches(1))
    torch.testing.assert_close(model.fc1.L.T @ model.fc1.L, torch.eye(model.fc1.rank), atol=1e-6, rtol=0)
    torch.testing.assert_close(model.fc1.L @ model.fc1.R, w, atol=0.05, rtol=0)  # one small step from W
    assert "row_gram" not in opt.state[model.fc1.R]


def test_a_wide_gradient_keeps_the_qr_basis():
    """r > K/4 (here ranks [2, 3, 4] at K = 10): the nearest basis would cost more, so the QR basis, new storage."""
    torch.manual_seed(0)
    model = _convert(NearNet(), lambda l: WASILinear.from_linear(l, 0.8, [2, 3, 4]))
    ptr = model.fc1.L.data_ptr()
    _train(model, SubspaceSGD(model, 0.05, basis="nearest"), _near_batches(1))
    assert model.fc1.L.data_ptr() != ptr


def test_an_unknown_basis_is_refused():
    with pytest.raises(ValueError, match="basis must be one of .*'qr', 'nearest'.*got 'householder'"):
        SubspaceSGD(_near_wasi(), 0.05, basis="householder")  # type: ignore[arg-type]
