"""The run folder's setting, checked before Hydra writes anything into it (a Hydra callback, conf/config.yaml).

`hydra.run.dir=` (empty) would make Hydra write `.hydra/`, `train.log` and every result into the current
folder, as would an empty `hydra.sweep.dir` for a multirun's jobs; a folder the run may not write into (read-only,
on a read-only file system, or under a file) would fail at Hydra's first write with a message about logging
handlers. All are refused with one line naming the setting (exit status 2, experiments.training.errors) before
any file is made. Hydra turns an Exception raised by a callback into a warning and goes on, so the refusal is a
RunFailed (a SystemExit), which it lets through.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from experiments.configuration.schema import ConfigError
from experiments.training.errors import SETTING, RunFailed


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
    err = ConfigError(f"{key}={value}: {reason}. Fix: {fix}")
    raise RunFailed(err, str(err), SETTING)


def configured(config: DictConfig, key: str) -> Any:
    """The resolved value of `key` in Hydra's config; a value that does not resolve yet (it names job fields that
    only the job sets) counts as set."""
    try:
        return OmegaConf.select(config, key, throw_on_resolution_failure=True)
    except Exception:  # resolved by Hydra later, for each job
        return "<set>"


class RunFolderCheck(Callback):
    """Refuses an empty hydra.run.dir (a run) or hydra.sweep.dir (a multirun) before the first file is written."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_folder("hydra.run.dir", configured(config, "hydra.run.dir"))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_folder("hydra.sweep.dir", configured(config, "hydra.sweep.dir"))
