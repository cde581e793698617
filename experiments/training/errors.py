"""How train.py ends when something goes wrong: one line on the terminal, the traceback in train.log.

    error: trainer.grad_clip=-1.0: must be a number > 0. Fix: trainer.grad_clip=2.0, or null to disable clipping

Exit status (the same for every tool of the suite: train.py, export, inference, report, bench):

    0    done
    1    the run failed (a missing dataset, no network, a full disk, a NaN loss, a bug)
    2    a wrong setting (found while composing the config, by experiments.configuration.schema.validate, or
         later, e.g. an infeasible method.budget_mib or a dataset.num_classes below the labels), a read-only
         run folder, or a wrong argument or input file of a tool
    130  SIGINT (Ctrl-C): the first one checkpoints at the next step boundary (experiments.training.signals);
         a second one, or one outside the training steps, stops at once, with one line saying what is on disk
    143  SIGTERM (the same as the first Ctrl-C)

`HYDRA_FULL_ERROR=1` shows Python's full traceback instead.

Two parts, both used by train.py: `logged` is around the task function's body (inside Hydra's job,
where conf/config.yaml routes this module's logger to the run's train.log only); `main` calls the
`@hydra.main` entry point and prints the line.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from experiments.configuration.schema import ConfigError, from_omegaconf

log = logging.getLogger(__name__)

SETTING, FAILURE, INTERRUPTED = 2, 1, 130  # exit statuses
MAX_LINE = 1000  # characters of a foreign error message shown on the terminal (train.log has all of it)


class RunFailed(SystemExit):
    """A single run failed and its traceback is in train.log. A SystemExit, so Hydra's job runner lets it
    through without printing anything; `main` prints `line` and exits with `code`."""

    def __init__(self, error: BaseException, line: str, code: int):
        super().__init__(code)
        self.error, self.line, self.status = error, line, code


@contextlib.contextmanager
def logged() -> Iterator[None]:
    """Around the task function's body: any exception's traceback goes to train.log. A single run then
    stops with RunFailed; a multirun job re-raises, so the launcher or sweeper records the failed job
    (Optuna counts it against max_failure_rate; the basic sweeper stops after the batch, and `main`
    reports it)."""
    try:
        yield
    except Exception as err:
        line = one_line(err)
        log.error("%s", line, exc_info=err)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        raise RunFailed(err, line + traceback_hint(err), status(err)) from err
    except KeyboardInterrupt as err:  # a second Ctrl-C in training, or one after it (the cost measurement)
        line = interrupted(run_folder())
        log.warning("%s", line)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        raise RunFailed(err, line, INTERRUPTED) from err


def main(entry: Callable[[], Any]) -> None:
    """Call the `@hydra.main` function `entry`; a failure prints one line to stderr and exits 2 or 1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for full tracebacks
        try:
            entry()
        except RunFailed as failed:
            raise failed.error from None
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises what it would print (composition errors, failed jobs)
    try:
        entry()
    except RunFailed as failed:
        stop(failed.line, failed.status)
    except KeyboardInterrupt:  # while composing, or in a multirun
        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        stop("interrupted by Ctrl-C (SIGINT) during a multirun: the train.log of each job says what it left"
             if multirun else interrupted(run_folder()), INTERRUPTED)
    except Exception as err:  # composing the config failed, or a job of a multirun (its train.log has it)
        stop(one_line(err), status(err))


def stop(line: str, code: int) -> None:
    print(f"error: {line}", file=sys.stderr)
    raise SystemExit(code)


def one_line(err: BaseException) -> str:
    """The error in one line: a setting's key, value and fix where it is about one, a read-only folder as such,
    else type and message."""
    if isinstance(err, ConfigError):
        return str(err)
    if (denied := read_only(err)) is not None:
        return denied
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, choice = err.missing_cfg_file.rpartition("/")
        options = ", ".join(err.options)
        return f"{group}={choice}: there is no conf/{group}/{choice}.yaml. Fix: {group}=<one of {options}>"
    if isinstance(err.__cause__, OmegaConfBaseException) and err.__cause__.full_key:  # Hydra merging an override
        return str(from_omegaconf(err.__cause__))
    if isinstance(err, OmegaConfBaseException) and err.full_key:
        return str(from_omegaconf(err))
    if isinstance(err, OverrideParseException):
        return (f"an override cannot be parsed ({flat(str(err).splitlines()[0])}). "
                "Fix: see https://hydra.cc/docs/advanced/override_grammar/basic/")
    message = flat(str(err))
    message = message if len(message) <= MAX_LINE else message[:MAX_LINE] + " …"
    return f"{type(err).__name__}: {message}"


def status(err: BaseException) -> int:
    """2 for a setting (ours, one Hydra could not compose, a read-only run folder), 1 for anything else."""
    from hydra.errors import HydraException

    setting = isinstance(err, (ConfigError, HydraException, OmegaConfBaseException)) or read_only(err) is not None
    return SETTING if setting else FAILURE


#: errno values of a write refused for want of permission, or on a read-only file system.
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def read_only(err: BaseException) -> str | None:
    """The line for a run folder the run may not write into (a PermissionError or EROFS on a file inside it, or
    Hydra's "Unable to configure handler 'file'" when train.log cannot be opened), naming the folder and the
    setting that moves it; None when `err` is not that (a file elsewhere, e.g. data, has its own message)."""
    denied = next((e for e in (err, err.__cause__, err.__context__)
                   if isinstance(e, OSError) and e.errno in DENIED and e.filename), None)
    if denied is None:
        return None
    path = Path(os.fsdecode(denied.filename)).absolute()
    folder = run_folder()
    if folder is None and str(err).startswith("Unable to configure handler"):  # Hydra opening train.log
        folder = path.parent
    if folder is None or folder not in (path, *path.parents):
        return None
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    state = "on a read-only file system" if denied.errno == errno.EROFS else "read-only"
    return (f"cannot write {path} ({denied.strerror}): the run folder {folder} is {state}. Fix: make it writable, "
            f"or pass {'hydra.sweep.dir' if multirun else 'hydra.run.dir'}=<a writable folder>")


def run_folder() -> Path | None:
    """This Hydra job's output folder (hydra.run.dir, or a multirun job's folder), once Hydra has set it."""
    with contextlib.suppress(Exception):  # not under Hydra, or before the job's folder is known
        if HydraConfig.initialized() and HydraConfig.get().runtime.output_dir:
            return Path(HydraConfig.get().runtime.output_dir).absolute()
    return None


def interrupted(run_dir: Path | None) -> str:
    """The line for a Ctrl-C that stopped the process at once: what the run folder holds, and how to go on."""
    if run_dir is None:
        return "interrupted by Ctrl-C (SIGINT) before the run started; nothing was written"
    from experiments.training import run_folder  # it refuses folders with RunFailed, from here

    last, results = run_dir / "last.ckpt", run_dir / "results.json"
    written = run_folder.read_results(run_dir)
    if written is not None and run_folder.finished(written):
        return f"interrupted by Ctrl-C (SIGINT) after the run finished: {results} holds its results"
    if written is not None and last.is_file():
        return (f"interrupted by Ctrl-C (SIGINT) during the cost measurement: {results} holds the accuracy, not yet "
                f"the cost. Measure it with the same overrides plus hydra.run.dir={run_dir} resume=true (nothing is "
                "trained again)")
    if last.is_file():
        return (f"interrupted by Ctrl-C (SIGINT): {last} holds the last checkpoint (all of training, if it had "
                f"ended) and {results} was not written. Continue with the same overrides plus "
                f"hydra.run.dir={run_dir} resume=true")
    return (f"interrupted by Ctrl-C (SIGINT) before the first checkpoint of {run_dir}: nothing to resume; "
            "run again to start over")


def traceback_hint(err: BaseException) -> str:
    """' (traceback: <train.log>)' for failures that are not about a setting; '' when no file holds it."""
    files = [h.baseFilename for h in log.handlers if isinstance(h, logging.FileHandler)]
    return f" (traceback: {files[0]})" if files and status(err) == FAILURE else ""


def flat(text: str) -> str:
    """Whitespace (newlines, indentation) collapsed to single spaces."""
    return " ".join(text.split())
