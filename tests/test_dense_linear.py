"""hardware.dense_linear=onednn (experiments.training.hardware) against nn.Linear, and experiments.gemm's file."""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from experiments import gemm
from experiments.builders.variant import build_variant, train_step
from experiments.configuration.schema import ConfigError
from experiments.measurement import metrics
from experiments.measurement.metrics import flop_counter
from experiments.training.hardware import OneDNNLinear, set_dense_linears, use_onednn_linears
from tests.helpers import QUICK, compose
from tests.tiny_models import saved_tensors
from wasi import WASILinear


def _pair(frozen: bool, bias: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, bias=bias), nn.GELU(), nn.Linear(16, 4))
    model[0].weight.requires_grad_(not frozen)
    twin = copy.deepcopy(model)
    assert use_onednn_linears(twin) == 2
    return model, twin


def _unsaved_elsewhere(fn, model: nn.Module) -> int:
    """Bytes autograd saved while fn ran, parameters (which it holds anyway) left out."""
    params = {p.data_ptr() for p in model.parameters()}
    _, saved = saved_tensors(fn)
    return sum(t.numel() * t.element_size() for t in saved if t is not None and t.data_ptr() not in params)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linears_give_nn_linears_outputs_gradients_and_saved_bytes(frozen, bias):
    model, twin = _pair(frozen, bias)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    grads = []
    for m in (model, twin):
        xi = x.clone().requires_grad_()
        out = m(xi)
        out.square().sum().backward()
        grads.append((out, xi.grad, *[p.grad for p in m.parameters()]))
    for ref, got in zip(*grads):
        if ref is None:
            assert got is None  # a frozen weight gets no gradient either way
        else:
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    bytes_ = [_unsaved_elsewhere(lambda m=m: m(x.clone().requires_grad_()), m) for m in (model, twin)]
    assert bytes_[0] == bytes_[1] > 0
    assert list(twin.state_dict()) == list(model.state_dict()) and type(twin[0]) is OneDNNLinear


def test_onednn_linears_run_no_aten_matrix_product_and_count_the_same_flops():
    model, twin = _pair(frozen=False, bias=True)
    x = torch.randn(6, 8)
    counts = []
    for m in (model, twin):
        counter = flop_counter()
        with counter:
            m(x).sum().backward()
        counts.append(counter)
    ops = {str(op) for op in counts[1].get_flop_counts()["Global"]}
    assert ops == {"mkldnn._linear_pointwise"}, ops  # no aten.mm or aten.addmm
    # x needs no grad: forward and weight gradient of the first layer, forward and both gradients of the second
    assert counts[0].get_total_flops() == counts[1].get_total_flops() == 2 * 6 * (2 * 8 * 16 + 3 * 16 * 4)


def test_the_setting_converts_the_linears_the_method_left_dense():
    variants = {d: build_variant(compose(*QUICK, "method=wasi", f"hardware.dense_linear={d}"), 10,
                                 [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))], torch.device("cpu"))
                for d in ("aten", "onednn")}
    kinds = {d: {type(m) for m in v.model.modules() if isinstance(m, nn.Linear | WASILinear)}
             for d, v in variants.items()}
    assert kinds == {"aten": {nn.Linear, WASILinear}, "onednn": {OneDNNLinear, WASILinear}}
    assert list(variants["aten"].model.state_dict()) == list(variants["onednn"].model.state_dict())
    v = variants["onednn"]
    loss = train_step(v.model.train(), v.optimizer, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), None,
                      torch.autocast("cpu", enabled=False))
    assert torch.isfinite(torch.as_tensor(loss)).all()


def test_the_setting_leaves_every_cost_figure_as_it_was():
    """FLOPs (torch's counter for the step, fvcore's trace for inference) and memory of one step are nn.Linear's."""
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    rows = []
    for dense in ("aten", "onednn"):
        torch.manual_seed(0)
        v = build_variant(compose(*QUICK, "method=wasi", f"hardware.dense_linear={dense}"), 10, [(x, y)],
                          torch.device("cpu"))
        rows.append(metrics.measure(v, x, y, grad_clip=None, amp=torch.autocast("cpu", enabled=False),
                                    device=torch.device("cpu"), repeats=0))
    assert rows[0] == rows[1] and rows[0]["flops/inference_per_image"] > 0


def test_the_setting_refuses_what_onednn_cannot_run(monkeypatch):
    hw = OmegaConf.create({"name": "cuda", "device": "cuda", "precision": "fp32", "dense_linear": "onednn"})
    with pytest.raises(ConfigError, match="runs fp32 on cuda. Fix: hardware.dense_linear=aten"):
        set_dense_linears(nn.Linear(2, 2), hw)
    monkeypatch.setattr(torch._C, "_has_mkldnn", False)
    with pytest.raises(ConfigError, match="is built without oneDNN. Fix: hardware.dense_linear=aten"):
        set_dense_linears(nn.Linear(2, 2), OmegaConf.merge(hw, {"name": "cpu", "device": "cpu"}))


def test_gemm_writes_each_product_of_each_backend_and_their_step_sum(tmp_path):
    out = gemm.main(["--tokens", "12", "--linear", "8x16", "16x8", "--blocks", "3", "--threads", "1",
                     "--warmup", "0", "--reps", "2", "--out", str(tmp_path)])
    frame = pd.read_csv(out / "gemm.csv")
    products = [f"{kind} {a}→{b}" for a, b in ((8, 16), (16, 8)) for kind in ("forward", "input grad", "weight grad")]
    assert list(frame["product"]) == [p for p in products for _ in range(2)] + ["step (3 blocks)"] * 2
    one = frame[frame["product"] != "step (3 blocks)"]
    per_product = 2 * 12 * 8 * 16  # every product of both shapes: T · in · out multiply-adds, by hand
    assert set(one.flops) == {per_product}
    for backend, rows in one.groupby("backend"):
        step = frame[(frame["product"] == "step (3 blocks)") & (frame.backend == backend)].iloc[0]
        assert step.flops == 3 * 6 * per_product and step.median_s == pytest.approx(3 * rows.median_s.sum())
    by_hand = [(3 * 6 if p.startswith("step") else 1) * per_product for p in frame["product"]]
    assert list(frame.gflop_s) == pytest.approx([f / t / 1e9 for f, t in zip(by_hand, frame.median_s)])
    aten = frame[frame.backend == "aten"].set_index("product").median_s
    onednn = frame[frame.backend == "onednn"].set_index("product")
    assert (frame[frame.backend == "aten"]["aten_s / this"] == 1).all()
    assert list(onednn["aten_s / this"]) == pytest.approx(list(aten[onednn.index] / onednn.median_s))
    assert (out / "summary.md").is_file() and (out / "run.json").is_file()
