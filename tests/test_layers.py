"""ASI / WSI / WASI layers against dense autograd, explicit reconstructions and hand byte counts."""
from collections.abc import Callable

import pytest
import torch
from torch import nn

from tests.tiny_models import saved_tensors
from wasi import ASILinear, WASILinear, WSILinear, tucker_reconstruct

SHAPES = {3: (2, 5, 8), 4: (2, 3, 4, 8)}  # (B, N, I) and (B, H, W, C); I = 8
OUT = 6


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(SHAPES[3][-1], OUT)


def _make(kind: str, linear: nn.Linear, ranks, epsilon: float = 1.0):
    if kind == "asi":
        return ASILinear.from_linear(linear, ranks)
    if kind == "wsi":
        return WSILinear.from_linear(linear, epsilon)
    if kind == "wsi_ref":
        return WSILinear.from_linear(linear, epsilon, weight_update="reference")
    if kind == "wasi_ref":
        return WASILinear.from_linear(linear, epsilon, ranks, weight_update="reference")
    return WASILinear.from_linear(linear, epsilon, ranks)


def _weight_grad(layer) -> torch.Tensor:
    """∇W as the layer exposes it: dense .grad (ASI, reference mode) or G Pᵀ (factored mode)."""
    if getattr(layer, "weight_update", "reference") == "factored":
        g, p = layer.factored_grad
        return g @ p.T
    return layer.weight.grad


@pytest.mark.parametrize("ndim", [3, 4])
@pytest.mark.parametrize("kind", ["wasi", "wasi_ref", "asi", "wsi", "wsi_ref"])
def test_full_ranks_match_dense_autograd(kind, ndim):
    linear = _linear()
    shape = SHAPES[ndim]
    layer = _make(kind, linear, list(shape))
    x = torch.randn(*shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref = linear(x_ref)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_weight_grad(layer), linear.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.bias.grad, linear.bias.grad, atol=1e-5, rtol=1e-5)
    if kind in ("wasi", "wsi"):
        assert layer.L.grad is None and layer.R.grad is None


@pytest.mark.parametrize("ndim", [3, 4])
@pytest.mark.parametrize("kind", ["wasi", "asi"])
def test_truncated_ranks_weight_grad_is_grad_of_reconstruction(kind, ndim):
    linear = _linear()
    shape = SHAPES[ndim]
    layer = _make(kind, linear, [2] * (ndim - 1) + [3], epsilon=0.7)
    x = torch.randn(*shape, requires_grad=True)
    y, saved = saved_tensors(lambda: layer(x))
    core, factors = saved[0], saved[1:]
    assert len(factors) == ndim and factors[-1].shape == (8, 3)
    dy = torch.randn_like(y)
    y.backward(dy)
    x_hat = tucker_reconstruct(core, factors)
    expected = dy.reshape(-1, OUT).T @ x_hat.reshape(-1, 8)
    torch.testing.assert_close(_weight_grad(layer), expected, atol=1e-5, rtol=1e-5)
    w = layer.weight if kind == "asi" else layer.L @ layer.R
    torch.testing.assert_close(x.grad, dy @ w, atol=1e-5, rtol=1e-5)  # dx does not depend on the compression
    if kind == "wasi":
        assert torch.linalg.matrix_rank(_weight_grad(layer)) <= 3


def test_wasi_saves_only_core_and_factors():
    layer = _make("wasi", _linear(), [2, 3, 4], epsilon=0.7)
    x = torch.randn(*SHAPES[3], requires_grad=True)
    _, saved = saved_tensors(lambda: layer(x))
    ranks = [2, 3, 4]
    expected = (2 * 3 * 4 + sum(n * r for n, r in zip(SHAPES[3], ranks))) * 4  # S + Σ U_m, float32
    assert sum(t.numel() * t.element_size() for t in saved) == expected
    report = layer.memory_report()
    assert report == {"activation_bytes": expected, "weight_bytes": (layer.rank * (OUT + 8) + OUT) * 4,
                      "dense_activation_bytes": 2 * 5 * 8 * 4, "dense_weight_bytes": (OUT * 8 + OUT) * 4}


def test_wsi_memory_report_and_state_dict_keys():
    layer = _make("wsi", _linear(), None, epsilon=0.6)
    layer(torch.randn(*SHAPES[3], requires_grad=True))
    k = layer.rank
    assert k < 6
    assert layer.memory_report() == {"activation_bytes": 2 * 5 * 8 * 4, "weight_bytes": (k * (OUT + 8) + OUT) * 4,
                                     "dense_activation_bytes": 2 * 5 * 8 * 4,
                                     "dense_weight_bytes": (OUT * 8 + OUT) * 4}
    assert {n: tuple(t.shape) for n, t in layer.state_dict().items()} == {"L": (OUT, k), "R": (k, 8), "bias": (OUT,)}
    ref = _make("wasi_ref", _linear(), [2, 2, 2], epsilon=0.6)
    ref(torch.randn(*SHAPES[3], requires_grad=True))
    assert sorted(ref.state_dict()) == ["L", "R", "bias", "weight"]  # warm-start factors are not saved
    with pytest.raises(RuntimeError, match="training forward"):
        _make("asi", _linear(), [1, 1, 1]).memory_report()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace, which fvcore uses
@pytest.mark.parametrize("kind", ["wasi", "wsi", "asi"])
def test_inference_is_plain_low_rank_linear(kind):
    layer = _make(kind, _linear(), [2, 2, 2], epsilon=0.7)
    x = torch.randn(*SHAPES[3])
    w = layer.weight if kind == "asi" else layer.L @ layer.R
    expected = torch.einsum("bni,oi->bno", x, w) + layer.bias
    layer.eval()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.train()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="training forward"):  # no training forward happened
        layer.memory_report()
    traced = torch.jit.trace(layer.eval(), x)
    ops = {n.kind() for n in traced.graph.nodes()}
    assert "aten::linear" in ops and not any("Subspace" in o or "PythonOp" in o for o in ops)


def test_batch_one_clipped_ranks_and_smaller_last_batch():
    linear = _linear()
    layer = _make("wasi", linear, [8, 50, 50], epsilon=0.7)
    for batch in (3, 3, 1, 3):  # a smaller batch re-initialises the batch factor, then grows back
        x = torch.randn(batch, 5, 8, requires_grad=True)
        y, saved = saved_tensors(lambda x=x: layer(x))
        # r_m <= min(n_m, ∏_{j≠m} n_j): batch 1 leaves 5 tokens, so at most 5 feature directions
        assert [tuple(u.shape) for u in saved[1:]] == [(batch, batch), (5, 5), (8, min(8, 5 * batch))]
        dy = torch.randn_like(y)
        y.backward(dy)
        expected = dy.reshape(-1, OUT).T @ x.detach().reshape(-1, 8)  # ranks clipped to full: exact
        g, p = layer.factored_grad
        torch.testing.assert_close(g @ p.T, expected, atol=1e-5, rtol=1e-5)
        layer.factored_grad = None


def test_bf16_autocast_on_cpu():
    linear = _linear()
    layer = _make("wasi", linear, [2, 5, 8], epsilon=1.0)
    asi = _make("asi", linear, [2, 5, 8])
    x = torch.randn(*SHAPES[3], requires_grad=True)
    for mod in (layer, asi):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = mod(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
    ones = torch.ones(2, 5, OUT)
    expected = ones.reshape(-1, OUT).T @ x.detach().reshape(-1, 8)
    g, p = layer.factored_grad
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close((g.float() @ p.float().T), expected, atol=0.1, rtol=0.05)
    assert asi.weight.grad.dtype == torch.float32 and asi.bias.grad.dtype == torch.float32
    torch.testing.assert_close(asi.weight.grad, expected, atol=0.1, rtol=0.05)
    torch.testing.assert_close(x.grad, 2 * ones @ linear.weight, atol=0.1, rtol=0.05)


def test_backward_twice_accumulates_factored_grad():
    layer = _make("wasi", _linear(), [2, 2, 3], epsilon=0.7)
    total = torch.zeros(OUT, 8)
    for _ in range(2):
        x = torch.randn(*SHAPES[3])
        y, saved = saved_tensors(lambda x=x: layer(x))
        dy = torch.randn_like(y)
        y.backward(dy)
        total += dy.reshape(-1, OUT).T @ tucker_reconstruct(saved[0], saved[1:]).reshape(-1, 8)
    g, p = layer.factored_grad
    assert g.shape == (OUT, 6) and p.shape == (8, 6)
    torch.testing.assert_close(g @ p.T, total, atol=1e-5, rtol=1e-5)


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="act_ranks must be positive"):
        ASILinear.from_linear(_linear(), [2, -1, 3])
    with pytest.raises(ValueError, match="weight_update"):
        WSILinear.from_linear(_linear(), 0.8, weight_update="dense")
    layer = _make("wasi", _linear(), [2, 2], epsilon=0.8)
    with pytest.raises(ValueError, match="one rank per mode"):
        layer(torch.randn(*SHAPES[3], requires_grad=True))


@pytest.mark.parametrize("kind", ["wasi", "wsi"])
def test_two_forwards_then_one_backward_pair_each_gradient_with_its_input(kind):
    """Every training forward hands its ∇W = G Pᵀ over through its own carriers, so two forwards whose losses are
    summed into one backward give Σ_i dy_iᵀ x̂_i (x̂ the Tucker reconstruction, or x for WSI), not a mix of them."""
    layer = _make(kind, _linear(), [2, 2, 3], epsilon=0.7)
    outs, inputs = [], []
    for _ in range(2):
        x = torch.randn(*SHAPES[3])
        y, saved = saved_tensors(lambda x=x: layer(x))
        outs.append(y)
        inputs.append(x if kind == "wsi" else tucker_reconstruct(saved[0], saved[1:]))
    dys = [torch.randn_like(y) for y in outs]
    sum((y * dy).sum() for y, dy in zip(outs, dys)).backward()
    expected = sum(dy.reshape(-1, OUT).T @ x.reshape(-1, 8) for dy, x in zip(dys, inputs))
    g, p = layer.factored_grad
    torch.testing.assert_close(g @ p.T, expected, atol=1e-5, rtol=1e-5)
    assert layer.L.grad is None and layer.R.grad is None


def test_gradient_carriers_hold_no_memory_and_are_made_ready_by_backward():
    """The (r, O) and (r, I) carriers have zero strides (one element of storage); a backward leaves a pair ready for
    the next forward, which takes it instead of making tensors."""
    from wasi.functional import factored_carriers
    g, p = factored_carriers(5, OUT, 8, torch.zeros(1))
    assert g.shape == (5, OUT) and p.shape == (5, 8) and g.is_leaf and g.requires_grad
    assert g.untyped_storage().nbytes() == p.untyped_storage().nbytes() == 4
    layer = _make("wasi", _linear(), [2, 2, 3], epsilon=0.7)
    layer(torch.randn(*SHAPES[3])).sum().backward()
    ready = layer._ready_carriers
    assert ready is not None and ready[0].shape == (3, OUT) and ready[1].shape == (3, 8)
    layer(torch.randn(*SHAPES[3])).sum().backward()
    assert layer._ready_carriers is not None and layer._ready_carriers[0] is not ready[0]


def test_random_tucker_start_is_reproducible_from_the_seed_and_leaves_the_global_rng():
    x = torch.randn(*SHAPES[3])
    first = {}
    for seed in (3, 3, 4):
        layer = WASILinear.from_linear(_linear(), 0.7, [2, 2, 3], seed=seed)
        state = torch.get_rng_state()
        layer(x).sum().backward()
        assert torch.equal(torch.get_rng_state(), state)
        first.setdefault(seed, []).append(layer.warm_start_state())
    a, b = first[3]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.allclose(a[1], first[4][0][1])
    assert layer.seed == 4 and "_seed" not in layer.state_dict()


def _ops_called(fn: Callable[[], object]) -> set[str]:
    """Names of the aten/mkldnn ops fn dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names: set[str] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            names.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return names


@pytest.mark.parametrize("bias", [False, True])
def test_factor_product_is_f_linear_through_onednn_on_the_cpu(bias):
    """x factorᵀ + b for (…, n) inputs and factors laid out either way, equal to F.linear; float32 on the CPU runs
    oneDNN's linear and nothing else, float64 runs F.linear's own ops."""
    from wasi.functional import factor_product

    x = torch.randn(3, 5, 16)
    b = torch.randn(8) if bias else None
    for factor in (torch.randn(8, 16), torch.randn(16, 8).T):  # contiguous, and a transposed view as dy L passes
        assert torch.allclose(factor_product(x, factor, b), nn.functional.linear(x, factor, b), atol=1e-5)
        if torch._C._has_mkldnn:  # PyTorch's CPU wheels have it
            assert _ops_called(lambda f=factor: factor_product(x, f, b)) == {"mkldnn._linear_pointwise"}
    x64, f64 = x.double(), torch.randn(8, 16, dtype=torch.float64)
    assert "mkldnn._linear_pointwise" not in _ops_called(lambda: factor_product(x64, f64))
    assert torch.equal(factor_product(x64, f64), nn.functional.linear(x64, f64))


def test_factor_product_gives_onednn_dense_operands():
    """A factor with padded rows (a column slice) and an x that is a transposed view reach oneDNN's linear as
    dense copies (its strided paths are far slower: wasi.functional.factor_product), with F.linear's result; a
    transposed factor, as dy L passes, goes as it is."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from wasi.functional import factor_product

    if not torch._C._has_mkldnn:
        pytest.skip("this PyTorch has no oneDNN")
    seen: list[tuple[bool, bool, bool]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if str(func.overloadpacket) == "mkldnn._linear_pointwise":
                x, w = args[0], args[1]
                seen.append((x.is_contiguous(), w.is_contiguous(), w.T.is_contiguous()))
            return func(*args, **(kwargs or {}))

    padded = torch.randn(8, 20)[:, :16]  # (8, 16), rows 20 apart
    x_t = torch.randn(16, 12).T  # (12, 16), a transposed view
    transposed = torch.randn(16, 8).T
    for x, factor in ((torch.randn(12, 16), padded), (x_t, torch.randn(8, 16)), (x_t, transposed)):
        with Record():
            out = factor_product(x, factor)
        assert torch.allclose(out, nn.functional.linear(x, factor), atol=1e-5)
    assert seen == [(True, True, False), (True, True, False), (True, False, True)]
