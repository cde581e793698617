"""A run folder is owned by one run: a new run in a folder that holds another run's work is refused before anything
is written (unless `overwrite=true`), a second process in a folder in use is refused (and a killed one leaves no
stale lock), and `-m ... resume=auto` continues a preempted sweep: its finished jobs left alone, its interrupted
one resumed, its missing one started."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiments import run as run_module
from experiments.configuration.overrides import flatten
from experiments.training import checkpoint, errors, run_folder
from experiments.training.checkpoint import Checkpointing
from tests.helpers import ENV, METHODS, QUICK, ROOT, SHAPES, compose


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below `folder`: its bytes and its modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def train_py(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# ---------------------------------------------------------------------------------------------
# 1. Another run's folder
# ---------------------------------------------------------------------------------------------

def test_the_same_command_again_into_a_finished_runs_folder_is_refused_and_touches_nothing(method_sweep, tmp_path):
    """A run of the method sweep, copied as it is; the same command into it again, without resume."""
    run_dir = tmp_path / "run"
    shutil.copytree(method_sweep / "0", run_dir)
    before = snapshot(run_dir)
    proc = train_py(*QUICK, *SHAPES, "logger.mode=offline", f"method={METHODS[0]}", f"hydra.run.dir={run_dir}",
                    f"paths.cache_dir={tmp_path}/cache")
    assert proc.returncode == errors.SETTING, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == [
        f"error: hydra.run.dir={run_dir}: holds another run's last.ckpt, best.safetensors and results.json, which a "
        "new run would overwrite. Fix: resume=true to continue it, hydra.run.dir=<a fresh folder> for a new run, or "
        "overwrite=true to replace it"]
    assert snapshot(run_dir) == before  # .hydra/overrides.yaml, train.log, the weights: all as they were
    assert ".hydra/overrides.yaml" in before and not (tmp_path / "cache").exists()


def test_a_folder_is_continued_replaced_or_refused_as_resume_and_overwrite_say(tmp_path):
    """In process, where the loop meets the folder (Checkpointing, before anything is built)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"test/acc": 0.5}))
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    make = lambda *overrides: compose(*QUICK, "logger.mode=disabled", *overrides, run_dir=run_dir)
    with pytest.raises(run_folder.FolderTaken) as info:
        Checkpointing(make())
    assert errors.one_line(info.value) == (f"the run folder {run_dir} holds another run's results.json, which a new "
                                           f"run would overwrite. Fix: {run_folder.CONTINUE}")
    assert errors.status(info.value) == errors.SETTING
    assert Checkpointing(make("resume=auto")).resume_from is None  # nothing to resume: it starts afresh, so
    assert sorted(p.name for p in run_dir.iterdir()) == []  # the unfinished run's leftovers are gone
    (run_dir / "best.safetensors").write_bytes(b"weights")
    Checkpointing(make("overwrite=true"))
    assert sorted(p.name for p in run_dir.iterdir()) == []
    (run_dir / "last.ckpt").write_bytes(b"a checkpoint")
    assert Checkpointing(make("resume=true")).resume_from == run_dir / "last.ckpt"
    assert Checkpointing(make(f"resume={run_dir / 'last.ckpt'}")).resume_from == run_dir / "last.ckpt"
    elsewhere = tmp_path / "other" / "last.ckpt"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"another run's checkpoint")
    with pytest.raises(run_folder.FolderTaken):  # a checkpoint from elsewhere into a folder another run owns
        Checkpointing(make(f"resume={elsewhere}"))


def test_a_sweep_into_an_earlier_sweeps_folder_is_refused_before_hydra_writes(tmp_path):
    sweep = tmp_path / "sweep"
    for job, files in (("0", ["results.json"]), ("1", ["last.ckpt"]), ("2", [])):
        (sweep / job / ".hydra").mkdir(parents=True)
        for name in files:
            (sweep / job / name).write_text("x")
    before = snapshot(sweep)
    config = lambda **top: OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, **top})
    with pytest.raises(errors.RunFailed) as info:  # what Hydra calls on_multirun_start with, before any file
        run_folder.RunFolderCheck().on_multirun_start(config(resume=None, overwrite=False))
    assert info.value.code == errors.SETTING and info.value.line == (
        f"hydra.sweep.dir={sweep}: holds an earlier sweep's jobs (0, 1: their checkpoints or results), which a new "
        "sweep would overwrite. Fix: resume=auto with that sweep's overrides to continue it (its interrupted jobs "
        "resume, its missing ones start), hydra.sweep.dir=<a fresh folder> for a new sweep, or overwrite=true to "
        "replace them")
    for allowed in ({"resume": "auto"}, {"resume": True}, {"overwrite": True}):
        run_folder.RunFolderCheck().on_multirun_start(config(**allowed))
    assert snapshot(sweep) == before


# ---------------------------------------------------------------------------------------------
# 2. Two processes in one folder
# ---------------------------------------------------------------------------------------------

def test_two_runs_started_at_once_in_one_folder_one_is_refused_and_a_killed_one_leaves_no_stale_lock(tmp_path):
    """The two differ in a W&B tag only, so the folder's .hydra/overrides.yaml tells whose it is."""
    run_dir = tmp_path / "run"
    args = [*QUICK, *SHAPES, "trainer.max_steps=null", "trainer.epochs=50", "trainer.measure=false",
            "logger.mode=disabled", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path}/cache"]
    runs = {tag: subprocess.Popen([sys.executable, "train.py", *args, f"logger.tags=[{tag}]"], cwd=ROOT, env=ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for tag in ("first", "second")}
    try:
        deadline = time.monotonic() + 300
        while all(p.poll() is None for p in runs.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = next(tag for tag, p in runs.items() if p.poll() is not None)
        running = next(tag for tag in runs if tag != refused)
        stderr = runs[refused].communicate(timeout=60)[1]
        assert runs[running].poll() is None, runs[running].communicate()[1][-3000:]
        while not (run_dir / ".hydra" / "overrides.yaml").exists() and runs[running].poll() is None:
            time.sleep(0.05)
    finally:
        for p in runs.values():
            p.kill()  # SIGKILL: no handler runs, nothing is cleaned up
            p.wait(timeout=60)
    assert runs[refused].returncode == errors.SETTING, stderr[-3000:]
    assert error_lines(stderr) == [
        f"error: hydra.run.dir={run_dir}: another train.py is running in it (it holds {run_dir}/.hydra/run.lock). "
        "Fix: wait for it to end, or pass hydra.run.dir=<another folder>"]
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert f"logger.tags=[{running}]" in overrides and refused not in overrides  # one run's folder, not a mix
    assert not list(run_dir.glob("*.tmp"))
    assert (run_dir / ".hydra" / "run.lock").is_file() and not run_folder.in_use(run_dir)  # the file, but no lock
    lock = run_folder.claim("hydra.run.dir", run_dir, "auto", False)  # the next run takes it at once
    lock.release()


def test_the_lock_is_held_for_as_long_as_the_run_and_released_after(tmp_path):
    """What Hydra calls around a run. flock locks belong to an open file, so this process's probe sees the lock the
    callback holds as another process would."""
    run_dir = tmp_path / "run"
    check = run_folder.RunFolderCheck()
    check.on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}}, "resume": None, "overwrite": False}))
    assert run_folder.in_use(run_dir)
    with pytest.raises(errors.RunFailed) as info:
        run_folder.RunFolderCheck().on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}}}))
    assert "another train.py is running in it" in info.value.line
    check.on_run_end(OmegaConf.create({}))
    assert not run_folder.in_use(run_dir)


# ---------------------------------------------------------------------------------------------
# 7. A preempted sweep, continued with one command
# ---------------------------------------------------------------------------------------------

def test_resume_auto_continues_a_checkpoint_leaves_a_finished_run_and_refuses_another_configs(tmp_path, monkeypatch):
    """What each job of `-m ... resume=auto` decides, in process (a job that never started: the test of resume and
    overwrite above; all three in a real preempted sweep: the slow test below)."""
    run_dir = tmp_path / "run"
    make = lambda *overrides: compose(*QUICK, "logger.mode=disabled", "resume=auto", *overrides, run_dir=run_dir)
    run_dir.mkdir()
    (run_dir / "last.ckpt").write_bytes(b"an interrupted run's checkpoint")
    assert Checkpointing(make()).resume_from == run_dir / "last.ckpt" and Checkpointing(make()).finished is None
    measured = {"test/acc": 0.5, "train/steps": 6, "flops/train_step": 1e6,
                **{f"config/{k}": v for k, v in flatten(OmegaConf.to_container(make(), resolve=True)).items()}}
    (run_dir / "results.json").write_text(json.dumps({k: v for k, v in measured.items() if k != "flops/train_step"}))
    assert Checkpointing(make()).finished is None  # stopped while measuring the cost: resume it
    (run_dir / "results.json").write_text(json.dumps(measured))
    monkeypatch.setattr("experiments.run.build_loaders", lambda *a: pytest.fail("built the loaders"))
    assert run_module.run(make()) == measured  # finished: its results, nothing trained or written
    with pytest.raises(checkpoint.CheckpointError, match=r"results.json is of another run: config seed: "
                       r"results.json 233, this run 1\. Fix: resume=auto with the overrides"):
        Checkpointing(make("seed=1"))
    assert json.loads((run_dir / "results.json").read_text()) == measured


@pytest.mark.slow
def test_a_preempted_sweep_is_continued_with_resume_auto(tmp_path):
    """Three jobs that train alike (they differ in a W&B tag only): SIGTERM while job 1 trains, so job 0 has
    finished, job 1 holds a mid-training checkpoint and job 2 never started. The same command plus resume=auto
    leaves job 0 as it was, resumes job 1 and starts job 2, and job 1 ends with the weights of the other two."""
    sweep = tmp_path / "sweep"
    args = ["-m", "model.kwargs.depth=1", "dataset.source.train_size=160", "dataset.source.test_size=32",
            "trainer.epochs=2", "trainer.batch_size=16", "trainer.eval_batches=1", "trainer.measure=false",
            "trainer.checkpoint_every=1", "logger.mode=disabled", "logger.tags=[a],[b],[c]",
            f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path}/cache"]  # 8 steps an epoch, 16 in all
    preempted = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (sweep / "1" / "last.ckpt").exists() and preempted.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    preempted.send_signal(signal.SIGTERM)
    _, stderr = preempted.communicate(timeout=300)
    assert preempted.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped = checkpoint.read(sweep / "1" / "last.ckpt")["progress"]["step"]
    assert 1 <= stopped < 16 and not (sweep / "1" / "results.json").exists() and not (sweep / "2").exists()
    finished = snapshot(sweep / "0")

    continued = subprocess.run([sys.executable, "train.py", *args, "resume=auto"], cwd=ROOT, env=ENV,
                               capture_output=True, text=True, timeout=600)
    assert continued.returncode == 0, continued.stderr[-3000:]
    results = [json.loads((sweep / job / "results.json").read_text()) for job in "012"]
    assert [r["train/steps"] for r in results] == [16, 16, 16]
    kept = lambda files: {k: v for k, v in files.items() if k in (*run_folder.REPLACED,)}
    assert kept(snapshot(sweep / "0")) == kept(finished) and len(kept(finished)) == 4  # job 0: nothing done again
    assert f"resumed from {sweep / '1' / 'last.ckpt'}: " in (sweep / "1" / "train.log").read_text()
    weights = [checkpoint.read(sweep / job / "last.ckpt")["model"] for job in "012"]
    assert all(torch.equal(weights[1][k], weights[j][k]) for j in (0, 2) for k in weights[1])
    assert results[1]["val/acc"] == results[2]["val/acc"] and results[1]["test/acc"] == results[2]["test/acc"]
