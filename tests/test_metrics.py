"""experiments.measurement.metrics against hand counts: analytic FLOPs, autograd's saved tensors, tensor sizes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
from torch import nn

from experiments.measurement import metrics
from wasi import WSILinear

F32 = 4  # bytes per float32 element


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, o))


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _sgd_step(model: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()

    return step


# ----------------------------------------------------------------------------- inference_flops


class _TokensLinear(nn.Module):
    """Image (1, 3, H, W) -> tokens (1, N, I) -> Linear(I, O); the reshape costs no flops."""

    def __init__(self, n: int, i: int, o: int):
        super().__init__()
        self.n, self.i = n, i
        self.fc = nn.Linear(i, o)  # bias on: fvcore does not count it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(1, self.n, self.i))


def test_inference_flops_linear_is_two_n_o_i_without_bias():
    n, i, o = 16, 12, 5  # 3 * 8 * 8 image elements = n * i
    model = _TokensLinear(n, i, o)
    assert metrics.inference_flops(model, 8) == 2 * n * o * i


@pytest.mark.parametrize("training", [True, False])
def test_inference_flops_restores_mode(training):
    model = _TokensLinear(16, 12, 5).train(training)
    metrics.inference_flops(model, 8)
    assert all(m.training is training for m in model.modules())


@pytest.mark.parametrize("fused_attn", [True, False])
def test_inference_flops_tiny_vit_matches_analytic_count(fused_attn):
    dim, depth, heads, mlp, classes, img, patch = 192, 2, 3, 768, 10, 32, 8
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img, patch_size=patch,
                              depth=depth, num_classes=classes)
    for block in model.blocks:  # fused: aten::scaled_dot_product_attention; else q @ kᵀ, attn @ v
        block.attn.fused_attn = fused_attn
    patches = (img // patch) ** 2
    tokens = patches + 1  # + class token
    linears = depth * tokens * (dim * 3 * dim + dim * dim + dim * mlp + mlp * dim) + dim * classes
    attention = depth * heads * tokens * tokens * 2 * (dim // heads)  # q kᵀ and attn v
    patch_embed = patches * dim * 3 * patch * patch
    layer_norms = (2 * depth + 1) * tokens * dim * 5  # fvcore: 5 per element for an affine norm
    macs = linears + attention + patch_embed + layer_norms
    assert metrics.inference_flops(model, img) == 2 * macs
    assert linears > 0.9 * macs  # the linear layers dominate: the analytic part that matters


# ----------------------------------------------------------------------------- train_step_flops


@pytest.mark.parametrize("input_grad", [False, True])
def test_train_step_flops_mlp_hand_count(input_grad):
    b, i, h, o = 8, 6, 10, 4
    model = _mlp(i, h, o)
    x = torch.randn(b, i, requires_grad=input_grad)
    step = _sgd_step(model, x, torch.optim.SGD(model.parameters(), lr=0.1))
    forward = 2 * b * i * h + 2 * b * h * o
    # backward: fc2 input grad + fc2 weight grad; fc1 weight grad, fc1 input grad only if x needs it
    backward = 2 * b * h * o + 2 * b * h * o + 2 * b * i * h + (2 * b * i * h if input_grad else 0)
    assert metrics.train_step_flops(step) == forward + backward


def test_train_step_flops_counts_in_place_matmuls():
    """The factored optimizer step updates R in place (`R'.addmm_(L'ᵀG, Pᵀ)`): 2·m·n·k like out-of-place addmm."""
    m, k, n = 5, 3, 7
    a, b, c = torch.randn(m, k), torch.randn(k, n), torch.zeros(m, n)
    assert metrics.train_step_flops(lambda: c.addmm_(a, b, alpha=-0.1)) == 2 * m * n * k
    assert metrics.train_step_flops(lambda: (c.addmm_(a, b), torch.addmm(c, a, b))) == 4 * m * n * k


def test_train_step_flops_counts_the_factor_products_like_f_linear():
    """On the CPU a low-rank factor product runs oneDNN's linear (wasi.functional.factor_product): 2·T·n·m FLOPs
    for x: (T, n) and a factor (m, n), as F.linear's matmul, bias not counted."""
    from wasi.functional import factor_product

    x, factor, bias = torch.randn(3, 5, 7), torch.randn(4, 7), torch.randn(4)
    assert metrics.train_step_flops(lambda: factor_product(x, factor, bias)) == 2 * 15 * 7 * 4
    assert metrics.train_step_flops(lambda: factor_product(x, factor.T.contiguous().T)) == 2 * 15 * 7 * 4
    assert metrics.train_step_flops(lambda: torch.nn.functional.linear(x, factor, bias)) == 2 * 15 * 7 * 4


def test_train_step_flops_skips_qr():
    a = torch.randn(32, 8)
    assert metrics.train_step_flops(lambda: torch.linalg.qr(a)) == 0


# ----------------------------------------------------------------------------- activation_bytes


def test_activation_bytes_mlp_hand_count():
    b, i, h, o = 8, 6, 10, 4
    model = _mlp(i, h, o)
    x = torch.randn(b, i)
    # Held for backward: the ReLU output (saved by ReLU and again, same storage, as fc2's input). fc1's
    # output is freed (ReLU saves its result), x existed before the forward, fc2.weightᵀ is a weight view.
    assert metrics.activation_bytes(lambda: model(x).sum(), model) == F32 * b * h
    assert metrics.held_activations(lambda: model(x).sum(), model) == {"1 (ReLU) / relu": F32 * b * h}


def test_activation_bytes_counts_shared_storage_once():
    base = torch.randn(6, 5, requires_grad=True)

    def forward() -> torch.Tensor:
        h = base.exp()  # exp saves its result
        return (h[:2] * h[2:4]).sum()  # mul saves two views of the same storage

    assert metrics.activation_bytes(forward, nn.Identity()) == F32 * 6 * 5


def test_activation_bytes_counts_what_checkpointing_holds():
    """With non-reentrant checkpointing the block keeps only its input; a saved-tensor count misses it."""
    b, i, h = 4, 6, 16
    torch.manual_seed(0)
    stem, block = nn.Linear(i, i), nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Linear(h, i))
    model = nn.Sequential(stem, block)
    x = torch.randn(b, i)

    def forward(checkpointed: bool) -> torch.Tensor:
        a = stem(x)
        out = torch.utils.checkpoint.checkpoint(block, a, use_reentrant=False) if checkpointed else block(a)
        return out.sum()

    # a (block input, saved by its first linear), the first linear's output (GELU input), GELU's output.
    assert metrics.activation_bytes(lambda: forward(False), model) == F32 * (b * i + 2 * b * h)
    assert metrics.activation_bytes(lambda: forward(True), model) == F32 * b * i  # a, held by the checkpoint


# ----------------------------------------------------------------------------- weight_bytes


def _frozen_first_layer() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    return model


TRAINABLE = 3 * 2 + 2  # second layer's weight and bias; the frozen first layer is excluded


@pytest.mark.parametrize(
    ("make_opt", "state_elements"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 0),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), TRAINABLE),  # momentum_buffer
        (lambda p: torch.optim.AdamW(p, lr=0.1), 2 * TRAINABLE + 2),  # exp_avg, exp_avg_sq, step × 2
    ],
    ids=["sgd", "sgd_momentum", "adamw"],
)
def test_weight_bytes_hand_count(make_opt, state_elements):
    model = _frozen_first_layer()
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    assert metrics.weight_bytes(model, opt) == F32 * TRAINABLE  # no grads, no state yet
    _sgd_step(model, torch.randn(5, 4), opt)()
    assert metrics.weight_bytes(model, opt) == F32 * (2 * TRAINABLE + state_elements)


def test_weight_bytes_counts_wasi_factored_grads():
    torch.manual_seed(0)
    layer = WSILinear.from_linear(nn.Linear(8, 6), epsilon=0.9)
    model = nn.Sequential(layer)
    (model(torch.randn(2, 3, 8)) * torch.randn(2, 3, 6)).sum().backward()  # dense dy: (2, 3, 6)
    g, p = layer.factored_grad
    k, r = layer.rank, g.shape[1]
    assert g.shape == (6, r) and p.shape == (8, r)
    # L, R, bias, bias.grad, G, P; L.grad and R.grad stay empty in factored mode
    expected = 6 * k + k * 8 + 6 + 6 + 6 * r + 8 * r
    assert metrics.weight_bytes(model, None) == F32 * expected


# ----------------------------------------------------------------------------- peak_bytes


def test_peak_bytes_cpu_known_allocations():
    mib = 2**20

    def step() -> None:
        four = torch.empty(mib)  # float32: 4 MiB
        eight = torch.ones(2 * mib)  # 8 MiB
        del four, eight  # 12 MiB live at once, then freed
        torch.empty(mib)  # 4 MiB afterwards does not raise the peak

    assert metrics.peak_bytes(step, "cpu") == 12 * mib
    model = _mlp(6, 10, 4)
    assert metrics.peak_bytes(step, "cpu", model) == _param_bytes(model) + 12 * mib


def test_peak_bytes_cpu_counts_tensors_from_python_data():
    assert metrics.peak_bytes(lambda: torch.tensor([0.5] * 256), "cpu") == 256 * F32


def test_peak_bytes_cpu_sees_backward_and_freed_grads():
    model = nn.Linear(512, 512)  # 1 MiB weight
    weight = _param_bytes(model)
    x = torch.randn(2, 512)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert metrics.peak_bytes(lambda: model(x).sum(), "cpu", model, opt) < 1.1 * weight  # forward only
    step = _sgd_step(model, x, opt)  # zero_grad sets grads to None; backward allocates new ones
    assert metrics.peak_bytes(step, "cpu", model, opt) >= 2 * weight  # backward's grads are seen
    # Grads resident at start are freed by zero_grad before the new ones exist: no double count.
    assert metrics.peak_bytes(step, "cpu", model, opt) < 2.1 * weight


def test_peak_bytes_cpu_mlp_step_bounds():
    b, i, h, o = 16, 32, 64, 8
    model = _mlp(i, h, o)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step() -> None:  # grads kept between steps, batch made inside the step
        opt.zero_grad(set_to_none=False)
        model(torch.randn(b, i)).sum().backward()
        opt.step()

    step()
    params = _param_bytes(model)
    saved = F32 * (b * i + b * h)  # x and the ReLU output
    peak = metrics.peak_bytes(step, "cpu", model, opt)
    assert 2 * params + saved <= peak <= 2 * params + 3 * (params + saved)
    assert peak >= 2 * params + metrics.activation_bytes(lambda: model(torch.randn(b, i)).sum(), model)


# ----------------------------------------------------------------------------- median_time, counts


def test_median_time_uses_recorded_durations():
    durations = [5.0, 1.0, 3.0, 9.0, 2.0]
    ticks = iter([t for d in durations for t in (100.0, 100.0 + d)])
    calls = []
    result = metrics.median_time(lambda: calls.append(1), warmup=2, repeats=5, timer=lambda: next(ticks))
    assert result == 3.0
    assert len(calls) == 7


def test_count_parameters_shared_and_frozen():
    model = _frozen_first_layer()  # Linear(4, 3) frozen, Linear(3, 2) trainable
    model.append(nn.Linear(2, 2))
    model.append(nn.Linear(2, 2))
    model[3].weight = model[2].weight  # tied: counted once
    frozen, trainable = 4 * 3 + 3, (3 * 2 + 2) + (2 * 2 + 2) + 2
    assert metrics.count_parameters(model) == {"total": frozen + trainable, "trainable": trainable}


def test_compressed_layers_bytes_matches_factor_shapes():
    """Paper count for one WASI layer, from its ranks and shapes by hand (float32, 4 bytes)."""
    import wasi
    from experiments.measurement.metrics import compressed_layers_bytes

    torch.manual_seed(0)
    B, N, I, O = 4, 6, 12, 10
    model = nn.Sequential(nn.Linear(I, O))
    layer = wasi.WASILinear.from_linear(nn.Linear(I, O), epsilon=0.9, act_ranks=[2, 3, 5])
    model[0] = layer
    layer(torch.randn(B, N, I, requires_grad=True)).sum().backward()
    K = layer.L.shape[1]
    compressed = (2 * 3 * 5 + B * 2 + N * 3 + I * 5) + (O * K + K * I + O)
    vanilla = B * N * I + O * I + O
    assert compressed_layers_bytes(model) == {
        "memory/compressed_layers_bytes": 4 * compressed,
        "memory/compressed_layers_vanilla_bytes": 4 * vanilla,
    }
    assert compressed_layers_bytes(nn.Linear(2, 2)) == {}


def test_the_environment_record_names_the_commit_the_cpu_and_the_openmp_wait_policy(monkeypatch):
    """The CPU's family and model numbers against lscpu's, an independent reading of them."""
    import shutil
    import subprocess

    from experiments.measurement.environment import environment
    from tests.helpers import ROOT
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    record = environment()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert record["code"]["commit"] == (head or None)
    assert record["machine"]["omp_wait_policy"] == "PASSIVE"
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if shutil.which("lscpu") else ""
    numbers = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    if "CPU family" in numbers:  # x86
        expected = f"family {numbers['CPU family'].strip()} model {numbers['Model'].strip()}"
        assert record["machine"]["cpu_id"] == expected
    assert record["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert environment()["machine"]["omp_wait_policy"] is None
