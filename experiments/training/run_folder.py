"""The run folder's setting, checked before Hydra writes anything into it (a Hydra callback, conf/config.yaml).

`hydra.run.dir=` (empty) or `=null` would make Hydra write `.hydra/`, `train.log` and every result into the
current folder, as would an empty `hydra.sweep.dir` for a multirun's jobs; both are refused with one line
(exit status 2, experiments.training.errors) before any file is made. Hydra turns an Exception raised by a
callback into a warning and goes on, so the refusal is a RunFailed (a SystemExit), which it lets through.
"""
from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from experiments.configuration.schema import ConfigError
from experiments.training.errors import SETTING, RunFailed


def check_folder(key: str, value: Any) -> None:
    """RunFailed (exit status 2, its line a ConfigError's) when the folder setting `key` is empty or blank."""
    if value is None or not str(value).strip():
        err = ConfigError(f"{key}={'' if value is None else value}: names no folder, so the run would write into "
                          f"the current one. Fix: drop {key} (Hydra's default folder under outputs/ or multirun/), "
                          f"or {key}=<a folder>")
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
