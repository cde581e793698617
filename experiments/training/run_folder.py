"""The run folder: its setting checked, and owned by one run at a time. A Hydra callback (conf/config.yaml) does
both before Hydra writes anything into the folder.

The setting. `hydra.run.dir=` (empty) would make Hydra write `.hydra/`, `train.log` and every result into the
current folder, as would an empty `hydra.sweep.dir` for a multirun's jobs; a folder the run may not write into
(read-only, on a read-only file system, or under a file) would fail at Hydra's first write with a message about
logging handlers. All are refused with one line naming the setting (exit status 2, experiments.training.errors)
before any file is made. Hydra turns an Exception raised by a callback into a warning and goes on, so the refusal
is a RunFailed (a SystemExit), which it lets through.

The owner. A folder holding a run's work (RUN_FILES: its checkpoint, best weights or results) belongs to that
run. A new run there is refused, naming `resume=true` and a fresh folder, unless `overwrite=true` asks to replace
it (the old run's files are then removed when the run starts). `resume=auto` continues it from `last.ckpt`,
leaves it as it is if it has finished, and starts it otherwise: one command continues a sweep, its interrupted
jobs resumed and its missing ones started. A sweep folder is checked the same way for the job folders in it.

In use. A running train.py holds an exclusive lock on `.hydra/run.lock` in its folder (filelock: flock on
Unix), and a second one started there is refused. The operating system drops the lock when its process ends,
however it ends (SIGKILL included), so a crashed run leaves no stale lock; the file itself stays, empty.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from experiments.configuration.schema import ConfigError
from experiments.training.errors import SETTING, RunFailed

log = logging.getLogger(__name__)

#: What makes a folder a run's: files that hold its work (a new run there would replace them).
RUN_FILES = ("last.ckpt", "best.safetensors", "results.json")
#: Also removed when `overwrite=true` replaces a run (the history of its metrics).
REPLACED = (*RUN_FILES, "metrics.jsonl")
LOCK = Path(".hydra") / "run.lock"
CONTINUE = "resume=true to continue it, hydra.run.dir=<a fresh folder> for a new run, or overwrite=true to replace it"


class FolderTaken(ConfigError):
    """A run folder holds another run's work, or another process is running in it (exit status 2)."""


# ---------------------------------------------------------------------------------------------
# The setting
# ---------------------------------------------------------------------------------------------

def check_folder(key: str, value: Any) -> None:
    """RunFailed (exit status 2, its line a ConfigError's) when the folder setting `key` is empty or blank, or
    names a folder this process cannot create or write into."""
    if value is None or not str(value).strip():
        refuse(key, "" if value is None else value, "names no folder, so the run would write into the current one",
               f"drop {key} (Hydra's default folder under outputs/ or multirun/), or {key}=<a folder>")
    folder = Path(str(value)).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        refuse(key, value, f"{existing} is a file, not a folder", f"{key}=<a folder>")
    if not os.access(existing, os.W_OK | os.X_OK):
        refuse(key, value, f"{existing} is read-only, so the run cannot write its files there",
               f"make it writable, or pass {key}=<a writable folder>")


def refuse(key: str, value: Any, reason: str, fix: str) -> None:
    err = FolderTaken(f"{key}={value}: {reason}. Fix: {fix}")
    raise RunFailed(err, str(err), SETTING)


def configured(config: DictConfig, key: str) -> Any:
    """The resolved value of `key` in Hydra's config; a value that does not resolve yet (it names job fields that
    only the job sets) counts as set."""
    try:
        return OmegaConf.select(config, key, throw_on_resolution_failure=True)
    except Exception:  # resolved by Hydra later, for each job
        return "<set>"


# ---------------------------------------------------------------------------------------------
# The owner
# ---------------------------------------------------------------------------------------------

def run_files(folder: Path) -> list[str]:
    """The RUN_FILES that `folder` holds."""
    return [name for name in RUN_FILES if (folder / name).is_file()]


def owner_problem(folder: Path, resume: Any, overwrite: Any) -> str | None:
    """Why a run with these `resume` and `overwrite` settings may not start in `folder`, or None: it holds another
    run's work, which the run neither continues (resume=true or auto, or resume=<a checkpoint in this folder>) nor
    is asked to replace (overwrite=true)."""
    files = run_files(folder)
    if not files or overwrite is True or resume is True or resume == "auto":
        return None
    if isinstance(resume, str) and resume and Path(resume).absolute().parent == folder.absolute():
        return None
    return f"holds another run's {_listed(files)}, which a new run would overwrite"


def sweep_problem(sweep_dir: Path, resume: Any, overwrite: Any) -> str | None:
    """Why a multirun with these settings may not start in `sweep_dir`, or None: job folders there hold an earlier
    sweep's work, which it neither continues (resume=auto, or resume=true) nor replaces (overwrite=true)."""
    if overwrite is True or resume is True or resume == "auto" or not sweep_dir.is_dir():
        return None
    jobs = sorted((p.name for p in sweep_dir.iterdir() if p.is_dir() and run_files(p)),
                  key=lambda name: (not name.isdigit(), int(name) if name.isdigit() else 0, name))
    if not jobs:
        return None
    shown = ", ".join(jobs[:5]) + (", …" if len(jobs) > 5 else "")
    return f"holds an earlier sweep's jobs ({shown}: their checkpoints or results), which a new sweep would overwrite"


def check_owner(folder: Path, resume: Any, overwrite: Any) -> None:
    """FolderTaken when `owner_problem` finds one (the in-process form of the callback's check)."""
    if (problem := owner_problem(folder, resume, overwrite)) is not None:
        raise FolderTaken(f"the run folder {folder} {problem}. Fix: {CONTINUE}")


def replace(folder: Path) -> None:
    """Remove a previous run's files (REPLACED) before this run writes its own: overwrite=true, or resume=auto
    where there is nothing to continue (no last.ckpt, no finished results)."""
    removed = [name for name in REPLACED if (folder / name).is_file()]
    for name in removed:
        (folder / name).unlink()
    if removed:
        log.warning("removed the previous run's %s from %s: this run starts afresh", _listed(removed), folder)


def read_results(folder: Path) -> dict | None:
    """The folder's results.json, or None when there is none or it cannot be read."""
    try:
        results = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


def finished(results: dict) -> bool:
    """Whether results.json holds a finished run. It is written once the test accuracy is known and, with
    trainer.measure, again after the cost measurement (experiments.measurement.results), so a run stopped while
    measuring holds the accuracy without the cost."""
    return results.get("config/trainer.measure") is False or "flops/train_step" in results


# ---------------------------------------------------------------------------------------------
# In use
# ---------------------------------------------------------------------------------------------

def in_use(folder: Path) -> bool:
    """Whether another process holds the folder's lock (the lock file is only read, never made)."""
    path = folder / LOCK
    if not path.is_file():
        return False
    probe = FileLock(path, timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False


def claim(key: str, folder: Path, resume: Any, overwrite: Any) -> FileLock:
    """This process's lock on `folder` (hydra.run.dir, or a multirun job's folder under `key`), after checking that
    no other process runs there and that no other run owns it; RunFailed (exit status 2) otherwise, with nothing
    written. Hold the returned lock for as long as the run writes into the folder."""
    taken = f"another train.py is running in it (it holds {folder / LOCK})"
    wait = f"wait for it to end, or pass {key}=<another folder>"
    if in_use(folder):
        refuse(key, folder, taken, wait)
    if (problem := owner_problem(folder, resume, overwrite)) is not None:
        refuse(key, folder, problem, CONTINUE.replace("hydra.run.dir", key))
    (folder / LOCK).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:  # it started in the meantime
        refuse(key, folder, taken, wait)
    return lock


def main_process() -> bool:
    """Whether this is the first (or only) process of its job: under torchrun every rank runs Hydra, and rank 0
    alone writes (experiments.training.distributed)."""
    return os.environ.get("RANK", "0") == "0"


def _listed(names: list[str]) -> str:
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


class RunFolderCheck(Callback):
    """Before Hydra writes anything: refuses an empty or read-only hydra.run.dir (a run) or hydra.sweep.dir (a
    multirun), a run folder that holds another run's work (or a sweep folder another sweep's jobs) unless `resume`
    continues it or `overwrite=true` replaces it, and a run folder another train.py is running in. The lock it
    takes is held until the run (or each multirun job) ends."""

    def __init__(self) -> None:
        self.lock: FileLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = configured(config, "hydra.run.dir")
        check_folder("hydra.run.dir", folder)
        if folder != "<set>" and main_process():
            self.lock = claim("hydra.run.dir", Path(str(folder)).absolute(), configured(config, "resume"),
                              configured(config, "overwrite"))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = configured(config, "hydra.sweep.dir")
        check_folder("hydra.sweep.dir", folder)
        resume, overwrite = configured(config, "resume"), configured(config, "overwrite")
        if folder != "<set>" and (problem := sweep_problem(Path(str(folder)), resume, overwrite)) is not None:
            refuse("hydra.sweep.dir", folder, problem,
                   "resume=auto with that sweep's overrides to continue it (its interrupted jobs resume, its missing "
                   "ones start), hydra.sweep.dir=<a fresh folder> for a new sweep, or overwrite=true to replace "
                   "them")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A multirun job's folder is known only now (Hydra has just written its .hydra/ there): lock it."""
        if config.hydra.mode == RunMode.MULTIRUN and main_process():
            folder = Path(config.hydra.runtime.output_dir)
            lock = FileLock(folder / LOCK, timeout=0)
            try:
                lock.acquire()
            except Timeout:
                refuse("hydra.sweep.dir", config.hydra.sweep.dir, f"its job folder {folder} is in use: another "
                       "train.py is running in it", "wait for it to end, or pass hydra.sweep.dir=<another folder>")
            self.lock = lock

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self.release()

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
