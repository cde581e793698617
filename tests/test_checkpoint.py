"""Checkpoint and resume: a run interrupted (crash, SIGTERM) and resumed ends exactly where an
uninterrupted run ends, in the same W&B run and with the same metrics.jsonl; damaged or foreign checkpoints
are refused with the reason and the fix (those of another config or process count before anything is
loaded); a NaN stops the run, leaves the last checkpoint intact and says which files exist and which fixes
apply."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import experiments.run as run_module
import wasi
from experiments.training import checkpoint
from experiments.training.checkpoint import (
    CheckpointError,
    Checkpointing,
    NonFiniteLossError,
    NonFiniteWeightsError,
    Progress,
)
from experiments.training.signals import StopRequest, TrainingInterrupted
from tests.helpers import ENV, ROOT, compose
from tests.wandb_log import offline_runs

# WASI with momentum, dropout and random flips, so optimizer state, Tucker warm start and every RNG matter.
# 128 train images / 16 = 8 steps per epoch, 16 in all; checkpoints every 3 steps land mid-epoch.
TINY = ["model=vit_tiny_cpu", "model.kwargs.depth=2", "+model.kwargs.drop_rate=0.1", "dataset.source.train_size=160",
        "dataset.source.test_size=64", "dataset.hflip=true", "trainer.epochs=2", "trainer.batch_size=16",
        "trainer.measure=false", "logger.mode=disabled", "method=wasi", "optimizer.momentum=0.9",
        "hardware.threads=1"]


def make_cfg(run_dir: Path, *overrides: str):
    return compose(*TINY, "trainer.checkpoint_every=3", *overrides, run_dir=run_dir)


def stop_at(monkeypatch, step: int, action):
    """Make the loop's train_step call `action(x)` on its `step`-th call (1-based)."""
    calls, original = [0], run_module.train_step

    def wrapped(model, optimizer, x, y, *args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            x = action(x)
        return original(model, optimizer, x, y, *args, **kwargs)

    monkeypatch.setattr(run_module, "train_step", wrapped)


class Crash(Exception):
    pass


def crash(x):
    raise Crash


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    return run_dir, run_module.run(make_cfg(run_dir))


def assert_same_run(a_dir: Path, a: dict, b_dir: Path, b: dict) -> None:
    """Same metrics (results.json and metrics.jsonl), bit-identical best weights and final checkpoint (weights
    and optimizer state)."""
    assert {k: v for k, v in a.items() if not k.startswith("config/")} == \
           {k: v for k, v in b.items() if not k.startswith("config/")}
    assert (a_dir / "metrics.jsonl").read_text() == (b_dir / "metrics.jsonl").read_text()
    best_a, best_b = load_file(str(a_dir / "best.safetensors")), load_file(str(b_dir / "best.safetensors"))
    assert best_a.keys() == best_b.keys() and all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    last_a, last_b = checkpoint.read(a_dir / "last.ckpt"), checkpoint.read(b_dir / "last.ckpt")
    position = [{k: v for k, v in last["progress"].items() if k != "wandb_run_id"} for last in (last_a, last_b)]
    assert position[0] == position[1] and last_a["scheduler"] == last_b["scheduler"]
    assert all(torch.equal(last_a["model"][k], last_b["model"][k]) for k in last_a["model"])
    state_a, state_b = last_a["optimizer"]["state"], last_b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and state_a
    assert all(torch.equal(state_a[i]["momentum_buffer"], state_b[i]["momentum_buffer"]) for i in state_a)


def test_resume_after_a_crash_matches_the_uninterrupted_run_and_continues_its_wandb_run(uninterrupted, tmp_path,
                                                                                        monkeypatch):
    """The first process dies during step 11 (its last checkpoint: step 9, epoch 2 batch 1); the resumed one ends
    as the uninterrupted run and logs under the same W&B run id from step 10 on, so `wandb sync` puts steps 1-16
    into one run."""
    run_dir = tmp_path / "run"
    stop_at(monkeypatch, 11, crash)
    with pytest.raises(Crash):
        run_module.run(make_cfg(run_dir, "logger.mode=offline"))
    saved = checkpoint.read(run_dir / "last.ckpt")
    assert saved["progress"] == {**saved["progress"], "epoch": 1, "batch": 1, "step": 9}
    assert saved["warm_start"][0] and all(len(f) == 3 for f in saved["warm_start"][0].values())
    monkeypatch.undo()
    shutil.copytree(run_dir, tmp_path / "step9")

    resumed = run_module.run(make_cfg(run_dir, "logger.mode=offline", "resume=true"))
    assert resumed["train/steps"] == 16
    assert_same_run(*uninterrupted, run_dir, resumed)
    first, second = sorted(offline_runs(run_dir).values(), key=lambda r: r[1][0])
    assert first[0] == second[0] == saved["progress"]["wandb_run_id"]
    assert first[1] == list(range(1, 11)) and second[1] == list(range(10, 17))  # steps 10 (its val/acc) on

    # The Tucker warm-start factors are what makes it exact: drop them and the run drifts. (Resumed into
    # another folder, which gets the interrupted run's best.safetensors.)
    ckpt = checkpoint.read(tmp_path / "step9" / "last.ckpt")
    ckpt["warm_start"] = [{}]
    torch.save(ckpt, tmp_path / "step9" / "cold.ckpt")
    cold_dir = tmp_path / "cold"
    cold = run_module.run(make_cfg(cold_dir, f"resume={tmp_path / 'step9' / 'cold.ckpt'}"))
    assert cold["train/steps"] == 16
    final = checkpoint.read(run_dir / "last.ckpt")["model"]
    cold_final = checkpoint.read(cold_dir / "last.ckpt")["model"]
    assert not all(torch.equal(final[k], cold_final[k]) for k in final)


def test_sigterm_checkpoints_at_a_step_boundary_then_resume_is_exact(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*TINY, "trainer.checkpoint_every=2", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path}/cache"]
    proc = subprocess.Popen([sys.executable, "train.py", *overrides], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run_dir / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM" in stdout and "resume=true" in stdout, stdout[-3000:]
    progress = Progress(**checkpoint.read(run_dir / "last.ckpt")["progress"])
    assert 2 <= progress.step < 16 and progress.step == 8 * progress.epoch + progress.batch
    assert not (run_dir / "results.json").exists()

    resumed = run_module.run(make_cfg(run_dir, "trainer.checkpoint_every=2", "resume=true"))
    assert_same_run(*uninterrupted, run_dir, resumed)


def test_a_run_cut_by_max_steps_then_resumed_for_the_whole_run_ends_as_the_uninterrupted_one(uninterrupted,
                                                                                              tmp_path):
    """Stopped by trainer.max_steps=5 in the first epoch (of 8 steps), then resumed without it: the rest of that
    epoch is trained, not skipped. The evaluation at the cut draws nothing from the random streams, so the steps
    after it are those of the uninterrupted run, dropout and random flips included."""
    run_dir = tmp_path / "run"
    cut = run_module.run(make_cfg(run_dir, "trainer.max_steps=5"))
    assert cut["train/steps"] == 5
    assert checkpoint.read(run_dir / "last.ckpt")["progress"] == {
        **checkpoint.read(run_dir / "last.ckpt")["progress"], "epoch": 0, "batch": 5, "step": 5, "evaluated": 5}
    resumed = run_module.run(make_cfg(run_dir, "resume=true"))
    assert resumed["train/steps"] == 16
    last_a, last_b = checkpoint.read(uninterrupted[0] / "last.ckpt"), checkpoint.read(run_dir / "last.ckpt")
    position = [{k: v for k, v in last["progress"].items() if k in ("epoch", "batch", "step", "loss")}
                for last in (last_a, last_b)]
    assert position[0] == position[1] == {**position[0], "epoch": 2, "batch": 0, "step": 16}
    assert all(torch.equal(last_a["model"][k], last_b["model"][k]) for k in last_a["model"])
    state_a, state_b = last_a["optimizer"]["state"], last_b["optimizer"]["state"]
    assert all(torch.equal(state_a[i]["momentum_buffer"], state_b[i]["momentum_buffer"]) for i in state_a)
    assert last_a["scheduler"] == last_b["scheduler"]


def test_resume_after_best_weights_were_deleted_evaluates_the_restored_weights_instead(uninterrupted, tmp_path,
                                                                                       caplog):
    """A finished training (e.g. stopped during the cost measurement) whose best.safetensors is gone: resume=true
    no longer fails at the test step, every time. The restored weights are evaluated, kept as the best, tested."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    (run_dir / "best.safetensors").unlink()
    (run_dir / "results.json").unlink()
    with caplog.at_level("WARNING", logger="experiments.training.checkpoint"):
        resumed = run_module.run(make_cfg(run_dir, "resume=true"))
    assert [r.getMessage() for r in caplog.records] == [
        f"{run_dir / 'best.safetensors'} is missing, so the best-validation weights behind the checkpoint's val/acc "
        f"{uninterrupted[1]['val/acc']:.4f} are lost: the restored weights (step 16) are evaluated and stand in as "
        "the best so far"]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_eval = [e["val/acc"] for e in logged if "val/acc" in e][-1]  # the final weights' val/acc, at step 16
    assert resumed["val/acc"] == last_eval and resumed["train/steps"] == 16
    best, final = load_file(str(run_dir / "best.safetensors")), checkpoint.read(run_dir / "last.ckpt")["model"]
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)


def test_a_stop_request_is_agreed_then_raises_its_interrupt_and_restores_the_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert stop.agree(torch.tensor(1.5)) == 1.5 and not stop.stopping
        stop.raise_if_stopping(3, "unused")  # nothing asked: no interrupt
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the process goes on
        assert stop.requested and not stop.stopping  # until the next step boundary agrees on it
        stop.agree(torch.tensor(1.0))
        with pytest.raises(TrainingInterrupted) as info:
            stop.raise_if_stopping(4, "checkpoint here")
        assert info.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_signal_inside_at_once_stops_there_and_then():
    """While W&B starts there is nothing new to checkpoint: SIGINT raises KeyboardInterrupt inside the wait,
    SIGTERM ends it with status 143, and a signal that came before (while building) stops the run on entry."""
    with StopRequest() as stop:
        with pytest.raises(KeyboardInterrupt), stop.at_once():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # a wait W&B would otherwise finish first
            pytest.fail("the wait went on")
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # before: only recorded
        assert stop.requested
        with pytest.raises(TrainingInterrupted) as info, stop.at_once():
            pytest.fail("entered")
        assert info.value.code == 143
    with StopRequest() as stop, stop.at_once():
        pass  # no signal: nothing happens
    assert not stop.requested


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    stop_at(monkeypatch, 5, lambda x: torch.full_like(x, math.nan))  # NaN images: NaN loss, grads, weights
    with pytest.raises(NonFiniteLossError) as info:
        run_module.run(make_cfg(run_dir, "trainer.checkpoint_every=1"))
    saved = checkpoint.read(run_dir / "last.ckpt")
    assert saved["progress"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())
    # What is true for this run: last.ckpt exists, best.safetensors not yet (no evaluation before step 8);
    # clipping is on (2.0) and precision is fp32, so the only fix left is the learning rate.
    assert str(info.value) == (f"loss is nan at step 4. {run_dir / 'last.ckpt'} holds the last good checkpoint "
                               "(not overwritten). Fix: lower optimizer.lr (now 0.05).")
    assert not (run_dir / "best.safetensors").exists()


def test_nan_before_any_checkpoint_says_so_and_suggests_clipping_when_it_is_off(tmp_path):
    ckpt = Checkpointing(make_cfg(tmp_path / "run", "trainer.grad_clip=null", "optimizer.lr=0.1"))
    ckpt.guard(2.5, 0)
    with pytest.raises(NonFiniteLossError) as info:
        ckpt.guard(math.nan, 0)
    assert str(info.value) == ("loss is nan at step 0. No checkpoint was written yet. Fix: lower optimizer.lr "
                               "(now 0.1), or set trainer.grad_clip=2.0 (clipping is off).")


def test_nan_advice_names_only_what_applies(tmp_path):
    cfg = make_cfg(tmp_path / "run", "optimizer.lr=0.001", "trainer.grad_clip=null", "hardware.precision=bf16")
    best, last = tmp_path / "best.safetensors", tmp_path / "last.ckpt"
    best.write_bytes(b"x")
    assert checkpoint.divergence_help(cfg, best, last) == (
        f"{best} holds the best-validation weights so far. Fix: lower optimizer.lr (now 0.001), or set "
        "trainer.grad_clip=2.0 (clipping is off), or use hardware.precision=fp32 (now bf16).")


# ---------------------------------------------------------------------------------------------
# Damaged and foreign checkpoints, on a small hand-built model
# ---------------------------------------------------------------------------------------------

def small_setup(seed: int = 0, out_features: int = 12):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, out_features))
    model[0] = wasi.WASILinear.from_linear(model[0], epsilon=0.9, act_ranks=[3, 4, 5])
    optimizer = wasi.SubspaceSGD(model, lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, n: int = 2) -> None:
    for _ in range(n):
        x = torch.randn(4, 6, 8)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    scheduler.step()


CONFIG = {"seed": 1, "method": {"name": "wasi", "epsilon": 0.9, "rank_table": "/a/cache"}, "trainer": {"epochs": 4}}


@pytest.fixture
def saved(tmp_path):
    model, optimizer, scheduler = small_setup()
    train_steps(model, optimizer, scheduler)
    path = tmp_path / "last.ckpt"
    rng = torch.get_rng_state()
    checkpoint.save(path, model, optimizer, scheduler, Progress(1, 0, 2, 0.5, 1.0),
                    [checkpoint.warm_start_state(model)], CONFIG)
    return path, model, optimizer, rng


def snapshot(model, optimizer):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(optimizer.state.values())},
            torch.get_rng_state(), model[0].warm_start_state())


def assert_untouched(before, model, optimizer):
    state, opt, rng, warm = before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert opt == {} and not optimizer.state  # a fresh optimizer stayed fresh
    assert torch.equal(rng, torch.get_rng_state()) and warm == model[0].warm_start_state() == []


def test_save_then_load_restores_everything(saved):
    path, trained, trained_opt, rng = saved
    model, optimizer, scheduler = small_setup(seed=1)  # other initial weights, same structure (and RNG)
    progress = checkpoint.load(path, model, optimizer, scheduler, CONFIG)
    assert progress == Progress(1, 0, 2, 0.5, 1.0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trained.state_dict().items())
    for (p, q) in zip(optimizer.state.values(), trained_opt.state.values()):
        assert torch.equal(p["momentum_buffer"], q["momentum_buffer"])
    assert [torch.equal(a, b) for a, b in zip(model[0].warm_start_state(), trained[0].warm_start_state())] == [True] * 3
    assert scheduler.last_epoch == 1 and optimizer.param_groups[0]["lr"] == trained_opt.param_groups[0]["lr"]
    assert torch.equal(torch.get_rng_state(), rng)  # the state at save time, not the reseeded one
    moved = {**CONFIG, "method": {**CONFIG["method"], "rank_table": "/elsewhere"}}  # a location may change
    checkpoint.load(path, *small_setup(), moved)


def replace(ckpt: dict, entry: str, key: str, value) -> dict:
    return {**ckpt, entry: {**ckpt[entry], key: value}}


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "not a readable checkpoint"),
    (lambda p: p.write_text("hello"), "not a readable checkpoint"),
    (lambda p: torch.save({"a.weight": torch.zeros(2)}, p), "not a wasi-train-checkpoint"),
    (lambda p: torch.save({**checkpoint.read(p), "format": "another-program"}, p), "not a wasi-train-checkpoint"),
    (lambda p: torch.save({k: v for k, v in checkpoint.read(p).items() if k != "optimizer"}, p), "lacks"),
    (lambda p: torch.save({**checkpoint.read(p), "warm_start": {"0": []}}, p), r"lacks \['warm_start'\]"),
    (lambda p: torch.save({**checkpoint.read(p), "version": 1}, p), "version 1 file, written by an earlier train.py"),
])
def test_damaged_checkpoint_is_refused_and_nothing_is_loaded(saved, damage, message):
    path = saved[0]
    damage(path)
    model, optimizer, scheduler = small_setup(seed=1)
    before = snapshot(model, optimizer)
    with pytest.raises(CheckpointError, match=message) as info:
        checkpoint.load(path, model, optimizer, scheduler, CONFIG)
    assert "Fix:" in str(info.value)
    assert_untouched(before, model, optimizer)


@pytest.mark.parametrize("damage,message", [
    (lambda c: replace(c, "model", "0.bias", "text"), r'parameter named "0.bias".*received <class .str.>'),
    (lambda c: replace(c, "optimizer", "param_groups", []), "different number of parameter groups"),
    (lambda c: {**c, "warm_start": [{"9": []}]}, "KeyError: '9'"),
    (lambda c: {**c, "progress": {"step": 2, "epochs": 1}}, "unexpected keyword argument 'epochs'"),
])
def test_an_entry_its_loader_rejects_stops_the_resume_with_the_reason(saved, damage, message):
    path = saved[0]
    torch.save(damage(checkpoint.read(path)), path)
    with pytest.raises(CheckpointError, match=message) as info:
        checkpoint.load(path, *small_setup(seed=1), CONFIG)
    assert "does not fit this run" in str(info.value) and "Fix:" in str(info.value)


@pytest.mark.parametrize("config,world_size,message", [
    ({**CONFIG, "method": {**CONFIG["method"], "epsilon": 0.8}}, 1,
     "config method.epsilon: checkpoint 0.9, this run 0.8"),
    ({**CONFIG, "seed": 2}, 1, "config seed"),
    (CONFIG, 2, "written by 1 processes, this run has 2"),
])
def test_foreign_checkpoint_is_refused_and_nothing_is_loaded(saved, config, world_size, message):
    model, optimizer, scheduler = small_setup(seed=1)
    before = snapshot(model, optimizer)
    with pytest.raises(CheckpointError, match=message) as info:
        checkpoint.load(saved[0], model, optimizer, scheduler, config, world_size=world_size)
    assert "does not belong to this run" in str(info.value) and "Fix:" in str(info.value)
    assert_untouched(before, model, optimizer)


def test_checkpoint_of_another_model_is_refused(saved):
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 12))  # dense: no L, R
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    with pytest.raises(CheckpointError, match=r'Missing key\(s\) in state_dict: "0.weight".*Unexpected.*"0.L"'):
        checkpoint.load(saved[0], model, optimizer, scheduler, CONFIG)
    model, optimizer, scheduler = small_setup(seed=1, out_features=10)  # another head size
    with pytest.raises(CheckpointError, match=r"size mismatch for 2\.weight"):
        checkpoint.load(saved[0], model, optimizer, scheduler, CONFIG)


def test_non_finite_weights_are_never_written(saved):
    path, model, optimizer, _ = saved
    before = path.read_bytes()
    with torch.no_grad():
        model[2].weight[0, 0] = math.inf
    with pytest.raises(NonFiniteWeightsError, match="2.weight"):
        checkpoint.save(path, model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1), Progress(), [{}], CONFIG)
    assert path.read_bytes() == before and not path.with_name("last.ckpt.tmp").exists()


def test_best_weights_are_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "best.safetensors"
    checkpoint.save_weights(path, {"w": torch.ones(3)})
    before = path.read_bytes()

    def dies_midway(tensors, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_weights(path, {"w": torch.zeros(3)})
    assert path.read_bytes() == before and not (tmp_path / "best.safetensors.tmp").exists()
    assert torch.equal(load_file(str(path))["w"], torch.ones(3))


def test_resume_without_a_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="hydra.run.dir"):
        checkpoint.resume_path(True, tmp_path)
    assert checkpoint.resume_path(None, tmp_path) is None
