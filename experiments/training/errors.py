"""How train.py ends when something goes wrong: one line on the terminal, the traceback in train.log.

    error: trainer.grad_clip=-1.0: must be a number > 0. Fix: trainer.grad_clip=2.0, or null to disable clipping

Exit status 2 for a wrong setting (found while composing the config, by experiments.configuration.schema.validate,
or later, e.g. an infeasible method.budget_mib), 1 for any other failure; SIGINT/SIGTERM keep their
130/143 (experiments.training.signals). `HYDRA_FULL_ERROR=1` shows Python's full traceback instead.

Two parts, both used by train.py: `logged` is around the task function's body (inside Hydra's job,
where conf/config.yaml routes this module's logger to the run's train.log only); `main` calls the
`@hydra.main` entry point and prints the line.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from experiments.configuration.schema import ConfigError, from_omegaconf

log = logging.getLogger(__name__)

SETTING, FAILURE = 2, 1  # exit statuses
MAX_LINE = 1000  # characters of a foreign error message shown on the terminal (train.log has all of it)


class RunFailed(SystemExit):
    """A single run failed and its traceback is in train.log. A SystemExit, so Hydra's job runner lets it
    through without printing anything; `main` prints `line` and exits with `code`."""

    def __init__(self, error: Exception, line: str, code: int):
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
    except Exception as err:  # composing the config failed, or a job of a multirun (its train.log has it)
        stop(one_line(err), status(err))


def stop(line: str, code: int) -> None:
    print(f"error: {line}", file=sys.stderr)
    raise SystemExit(code)


def one_line(err: BaseException) -> str:
    """The error in one line: a setting's key, value and fix where it is about one, else type and message."""
    if isinstance(err, ConfigError):
        return str(err)
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
    """2 for a setting (ours, or one Hydra could not compose), 1 for anything else."""
    from hydra.errors import HydraException

    return SETTING if isinstance(err, (ConfigError, HydraException, OmegaConfBaseException)) else FAILURE


def traceback_hint(err: BaseException) -> str:
    """' (traceback: <train.log>)' for failures that are not about a setting; '' when no file holds it."""
    files = [h.baseFilename for h in log.handlers if isinstance(h, logging.FileHandler)]
    return f" (traceback: {files[0]})" if files and status(err) == FAILURE else ""


def flat(text: str) -> str:
    """Whitespace (newlines, indentation) collapsed to single spaces."""
    return " ".join(text.split())
