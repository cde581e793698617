"""Data parallelism on CPU (Gloo): two processes keep bit-identical weights and subspace state, and take
the same steps as one process on the same global batch (to float32 rounding)."""
import contextlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import experiments.run as run_module
import wasi
import wasi.distributed
from experiments.builders.variant import train_step
from experiments.training import checkpoint, distributed
from tests.helpers import ENV, ROOT, compose
from tests.tiny_models import vit

STEPS, GLOBAL_BATCH = 3, 8
# (name, WASIConfig kwargs, whether one process on the global batch computes the same gradient):
# WSI saves inputs dense and WASI with full Tucker ranks is lossless, so both average exactly;
# lossy WASI fits Tucker factors to each rank's half batch, a different (equally valid) estimate.
CASES = [
    ("wsi", {"activation": False}, True),
    ("wsi_reference", {"activation": False, "weight_update": "reference"}, True),  # dense W: DDP reduces its grad
    ("wasi_lossless", {"activation": True, "ranks": [512, 512, 512]}, True),  # clipped to every mode size
    ("wasi", {"activation": True, "ranks": [2, 4, 6]}, False),
    ("wasi_nearest", {"activation": True, "ranks": [2, 2, 2], "basis": "nearest"}, False),  # gathered r = 4 ≤ K/4
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_vit_steps(kwargs: dict, ctx: distributed.Context, steps: int = STEPS) -> dict:
    """`steps` steps of SubspaceSGD (momentum, weight decay, clipping) on a 1-block ViT; this rank trains on
    its share [rank::N] of each fixed global batch (kwargs: WASIConfig's, and the optimizer's `basis`). Returns the
    weights and optimizer state."""
    options = dict(kwargs)
    basis = options.pop("basis", "qr")
    model = vit(0, image_size=16, width=32, depth=1)
    calibration = (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)), None)
    wasi.inject(model, wasi.WASIConfig(weight=True, epsilon=0.9, targets="mlp+attn", **options), calibration)
    optimizer = wasi.SubspaceSGD(model, lr=0.5, momentum=0.9, weight_decay=1e-3, basis=basis)
    storage = [layer.L.data_ptr() for _, layer in wasi.factored_layers(model)]
    ddp_model = distributed.wrap(model, ctx)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=data)
        y = torch.randint(0, 5, (GLOBAL_BATCH,), generator=data)
        x, y = x[ctx.rank::ctx.world_size], y[ctx.rank::ctx.world_size]
        train_step(ddp_model, optimizer, x, y, 0.5, contextlib.nullcontext())
    distributed.check_replicas_equal(model, ctx)
    if basis == "nearest":  # every layer took the nearest basis: L changed in place
        assert [layer.L.data_ptr() for _, layer in wasi.factored_layers(model)] == storage
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    state.update({f"momentum.{i}": s["momentum_buffer"].clone() for i, s in enumerate(optimizer.state.values())})
    return state


# Per layer, r_k of rank 0 and rank 1 (0: no gradient on that rank).
UNEVEN = [(3, 0), (2, 5)]


def uneven_gather(ctx: distributed.Context) -> dict:
    """reduce_factored_grads on two layers whose local factored grads have different r on each rank
    (run twice: the second call must not gather again). Returns the local and the reduced (G, P)."""
    out = {}
    layers = [wasi.WSILinear(torch.linalg.qr(torch.randn(5, 2))[0], torch.randn(2, 4), None) for _ in UNEVEN]
    torch.manual_seed(10 + ctx.rank)
    for i, (layer, rs) in enumerate(zip(layers, UNEVEN)):
        if rs[ctx.rank]:
            layer.accumulate_factored_grad(torch.randn(5, rs[ctx.rank]), torch.randn(4, rs[ctx.rank]))
            out[f"{i}.local"] = layer.factored_grad[0] @ layer.factored_grad[1].T
    for _ in range(2):
        wasi.distributed.reduce_factored_grads(layers)
    for i, layer in enumerate(layers):
        out[f"{i}.g"], out[f"{i}.p"] = layer.factored_grad
    return out


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with distributed.process_group("cpu") as ctx:
        results = {name: tiny_vit_steps(kwargs, ctx) for name, kwargs, _ in CASES}
        results["uneven"] = uneven_gather(ctx)
        torch.save(results, f"{out}/rank{rank}.pt")


@pytest.mark.slow  # make test-slow
def test_two_gloo_ranks_stay_identical_and_match_one_process(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, kwargs, exact in CASES:
        a, b = ranks[0][name], ranks[1][name]
        assert a.keys() == b.keys() and any(k.endswith(".L") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), name  # bit-identical on both ranks
        if exact:
            single = tiny_vit_steps(kwargs, distributed.Context())
            assert single.keys() == a.keys()
            for k in a:
                torch.testing.assert_close(a[k], single[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
        else:  # the factors moved (a real step), identically on both ranks
            initial = tiny_vit_steps(kwargs, distributed.Context(), steps=0)
            assert all(not torch.allclose(a[k], initial[k]) for k in initial if k.endswith((".L", ".R")))

    # ∇W = mean over ranks of G_k P_kᵀ, gathered along r (r_k may differ or be 0), the same on both ranks.
    a, b = ranks[0]["uneven"], ranks[1]["uneven"]
    for i, rs in enumerate(UNEVEN):
        assert all(torch.equal(a[f"{i}.{t}"], b[f"{i}.{t}"]) for t in "gp") and a[f"{i}.g"].shape == (5, sum(rs))
        dense = sum(r[f"{i}.local"] for r in (a, b) if f"{i}.local" in r) / 2
        torch.testing.assert_close(a[f"{i}.g"] @ a[f"{i}.p"].T, dense)


@pytest.mark.slow  # a subprocess run of its own; make test-slow
def test_torchrun_two_processes_match_one_process_run(tmp_path):
    """`torchrun --nproc_per_node=2 train.py` with batch 8 per process trains like one process with batch 16."""
    overrides = ["model=vit_tiny_cpu", "model.kwargs.depth=2",
                 "dataset.source.train_size=160", "dataset.source.test_size=64",
                 "trainer.epochs=1", "trainer.measure=false", "logger.mode=disabled", "method=wsi",
                 "optimizer.momentum=0.9", "hardware.threads=1"]
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *overrides, "trainer.batch_size=8", f"hydra.run.dir={two}",
                           f"paths.cache_dir={tmp_path}/cache"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = run_module.run(compose(*overrides, "trainer.batch_size=16", run_dir=tmp_path / "one"))
    two_results = json.loads((two / "results.json").read_text())
    assert two_results["train/steps"] == one["train/steps"] == 8
    assert two_results["val/acc"] == one["val/acc"]
    assert two_results["config/trainer.batch_size"] == 8
    w2, w1 = checkpoint.read(two / "last.ckpt"), checkpoint.read(tmp_path / "one" / "last.ckpt")
    assert w2["world_size"] == 2 and w1["world_size"] == 1
    for k in w1["model"]:
        torch.testing.assert_close(w2["model"][k], w1["model"][k], rtol=1e-4, atol=1e-5, msg=k)
