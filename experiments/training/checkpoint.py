"""Training checkpoints (`last.ckpt`): write atomically, validate completely, then resume exactly.

A checkpoint is one `torch.save` of plain containers and tensors, read back only with
`torch.load(weights_only=True)`:

    format, version    "wasi-train-checkpoint", 1
    model              model.state_dict() (WSI/WASI layers: their factors L, R and bias only)
    optimizer          optimizer.state_dict() (SubspaceSGD: momentum buffers, lr per group)
    scheduler          LR scheduler state_dict
    progress           Progress: epoch, batches done in that epoch, step, best val acc, last loss, the
                       W&B run id (a resumed run logs to the same W&B run), the step last evaluated
    rng                python, numpy (as lists), torch CPU and CUDA generator states (rank 0's;
                       every rank seeds and draws alike); the data order needs none: it is a
                       function of (seed, epoch, position), see experiments.training.distributed.EpochSampler
    warm_start         per rank, {layer name: [U_m]}: the Tucker factors the next ASI/WASI forward
                       warm-starts from (not in the state_dict; without them a resumed run would
                       restart them from the seeded Gaussian and drift slightly)
    world_size         number of data-parallel processes
    config             the resolved run config

`load` refuses a file that is not one of these (truncated, foreign, an entry missing), or whose config
or number of processes differs from this run's, before loading anything; then it hands each entry to
its own loader (`load_state_dict` of model, optimizer and scheduler, strict), and turns whatever they
reject into CheckpointError. Either way the run stops with the reason and the fix.

`best.safetensors` (the best-validation weights) is written with `save_weights`, atomically too. Both are
written through experiments.training.storage.atomic: a full disk stops the run with DiskFullError, naming the
file and the disk, and leaves the previous file intact.

`Checkpointing` is what the training loop holds: one run folder's checkpoints, the NaN guard and the
warm-start gathering across processes, built on the functions below.
"""
from __future__ import annotations

import logging
import math
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from experiments.configuration.overrides import as_override, flatten
from experiments.configuration.schema import ConfigError
from experiments.training import distributed, run_folder
from experiments.training.storage import atomic, resume_fix
from wasi import ASILinear, WSILinear

log = logging.getLogger(__name__)

FORMAT, VERSION = "wasi-train-checkpoint", 2  # 2: the scheduler entry is a `scheduler` group's state
ENTRIES = {"model": dict, "optimizer": dict, "scheduler": dict, "progress": dict, "rng": dict, "warm_start": list,
           "world_size": int, "config": dict}
# Config entries that must equal the checkpoint's for the run to be a continuation of it.
IDENTITY = ("seed", "model", "dataset", "method", "optimizer", "scheduler", "trainer.batch_size", "trainer.epochs",
            "trainer.grad_clip", "trainer.label_smoothing", "trainer.shuffle", "trainer.drop_last",
            "hardware.precision")
# Locations rather than content: a resumed run may read data and caches from elsewhere.
LOCATIONS = {"dataset.source.root", "dataset.source.download", "method.rank_table", "method.cache"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not belong to this run; nothing was loaded."""


class NoCheckpointError(CheckpointError, ConfigError):
    """`resume` names no checkpoint: a wrong setting (exit status 2), found before anything is built."""


class NonFiniteWeightsError(FloatingPointError):
    """The weights became NaN or inf; the last checkpoint was left as it was."""


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf."""


@dataclass
class Progress:
    """Where training stands. epoch: the epoch in progress (0-based); batch: its batches already
    trained (0 at an epoch boundary; a run cut by trainer.max_steps stays inside its last epoch, so a resume
    with more steps continues it); step: optimizer steps so far; best_acc: best val/acc so far
    (-1 before the first evaluation); loss: the last training loss; wandb_run_id: the W&B run this training
    logs to (None: none yet, or logging disabled); evaluated: the step of the last evaluation (-1: none)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_acc: float = -1.0
    loss: float = math.nan
    wandb_run_id: str | None = None
    evaluated: int = -1

    def advance(self, loss: float) -> None:
        """One more optimizer step in this epoch; `loss` its training loss."""
        self.step, self.batch, self.loss = self.step + 1, self.batch + 1, loss

    def finish_epoch(self) -> None:
        self.epoch, self.batch = self.epoch + 1, 0


class Checkpointing:
    """One run's checkpoints, in its folder (rank 0's `paths.run_dir`: its default name holds a time):
    last.ckpt (resume) and best.safetensors (the best-validation weights, tested at the end).

    Every process of a job makes one and calls every method (save and load are collectives); rank 0 alone
    writes. Made before anything is built, so `resume=true` without a checkpoint, or a folder that holds
    another run's work (experiments.training.run_folder: FolderTaken), stops the run at once; `overwrite=true`
    removes that run's files. With `resume=auto`, `finished` holds the results of a run that has finished there.
    """

    def __init__(self, cfg: DictConfig, ctx: distributed.Context = distributed.Context()):
        self.cfg, self.ctx = cfg, ctx
        self.run_dir = Path(str(distributed.broadcast(cfg.paths.run_dir, ctx)))
        self.last, self.best = self.run_dir / "last.ckpt", self.run_dir / "best.safetensors"
        self.resume_from = resume_path(cfg.resume, self.run_dir)
        run_folder.check_owner(self.run_dir, cfg.resume, cfg.overwrite)  # FolderTaken: another run's work is there
        self.config: dict = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        #: resume=auto in a folder whose run has finished: its results, and nothing to do
        self.finished = finished_results(self.run_dir, self.config) if cfg.resume == "auto" else None
        distributed.barrier(ctx)  # every process has looked at the folder before rank 0 changes it
        starts_over = cfg.resume == "auto" and self.resume_from is None and self.finished is None
        if ctx.is_main and (cfg.overwrite or starts_over):  # nothing there to continue: remove what was left
            run_folder.replace(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.best_lost = False  # set by restore: the checkpoint's best weights are gone (re-evaluate)
        self.every: int | None = cfg.trainer.checkpoint_every
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._scheduler: Any = None

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> Progress:
        """Remember what `save` writes; with resume set, load it all from the checkpoint (its best weights
        copied along when it is in another folder). Returns where training stands."""
        self._model, self._optimizer, self._scheduler = model, optimizer, scheduler
        if self.resume_from is None:
            return Progress()
        progress = load(self.resume_from, model, optimizer, scheduler, self.config, self.ctx.rank,
                        self.ctx.world_size)
        if self.ctx.is_main:
            carry_best(self.resume_from, self.best, progress)
        self.best_lost = bool(distributed.broadcast(progress.best_acc >= 0 and not self.best.is_file(), self.ctx))
        if self.best_lost:
            log.warning("%s is missing, so the best-validation weights behind the checkpoint's val/acc %.4f are "
                        "lost: the restored weights (step %d) are evaluated and stand in as the best so far",
                        self.best, progress.best_acc, progress.step)
        return progress

    def due(self, step: int) -> bool:
        """Whether `trainer.checkpoint_every` asks for a checkpoint after this step."""
        return self.every is not None and step % self.every == 0

    def guard(self, loss: float, step: int) -> None:
        """NonFiniteLossError if the loss is NaN/inf, naming the files written so far and the fixes left."""
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss} at step {step}. {self.divergence_help()}")

    def save(self, progress: Progress) -> None:
        """last.ckpt with every process's Tucker warm-start factors. Every process checks the weights are
        finite first, so a NaN stops all of them and keeps the previous file (NonFiniteWeightsError)."""
        model, optimizer = self._model, self._optimizer
        assert model is not None and optimizer is not None, "Checkpointing.restore comes first"
        check_finite(model, optimizer, progress.step, self.last, self.divergence_help())
        warm_start = distributed.all_gather_objects(warm_start_state(model), self.ctx)
        if self.ctx.is_main:
            save(self.last, model, optimizer, self._scheduler, progress, warm_start, self.config)  # type: ignore[arg-type]

    def save_best(self) -> None:
        """best.safetensors from the current weights (rank 0)."""
        if self.ctx.is_main and self._model is not None:
            save_weights(self.best, self._model.state_dict())

    def load_best(self, model: nn.Module) -> None:
        """The best-validation weights into `model`, on every process (after rank 0 has written them)."""
        distributed.barrier(self.ctx)
        load_model_state(model, load_file(str(self.best), device=str(next(model.parameters()).device)))

    @property
    def how_to_resume(self) -> str:
        return (f"checkpoint {self.last}. Continue with the same overrides plus hydra.run.dir={self.run_dir} "
                "resume=true")

    def divergence_help(self) -> str:
        return divergence_help(self.cfg, self.best, self.last)


def divergence_help(cfg: DictConfig, best_path: Path, last_path: Path) -> str:
    """What to tell when the loss or the weights became NaN/inf: the files this run has written so far
    and the fixes its config leaves open."""
    written = [f"{path} holds {what}" for path, what in ((best_path, "the best-validation weights so far"),
                                                          (last_path, "the last good checkpoint (not overwritten)"))
               if path.is_file()]
    fixes = [f"lower optimizer.lr (now {cfg.optimizer.lr:g})"]
    fixes += ["set trainer.grad_clip=2.0 (clipping is off)"] if cfg.trainer.grad_clip is None else []
    fixes += [f"use hardware.precision=fp32 (now {cfg.hardware.precision})"] if cfg.hardware.precision != "fp32" else []
    return f"{'; '.join(written) or 'No checkpoint was written yet'}. Fix: {', or '.join(fixes)}."


def resume_path(resume: bool | str | None, run_dir: Path) -> Path | None:
    """`resume=true` -> run_dir/last.ckpt (pass the interrupted run's hydra.run.dir); `resume=auto` -> the
    same if it exists, else None (a fresh run: a sweep's jobs that never started); another string -> that
    file; null/false -> None (a fresh run)."""
    if resume is None or resume is False:
        return None
    if resume == "auto":
        return run_dir / "last.ckpt" if (run_dir / "last.ckpt").is_file() else None
    path = run_dir / "last.ckpt" if resume is True else Path(str(resume))
    if not path.is_file():
        raise NoCheckpointError(
            f"resume={as_override(resume)} but there is no checkpoint at {path}. Fix: pass the interrupted run's "
            "folder as hydra.run.dir=<its folder> with resume=true, or resume=/path/to/last.ckpt, or resume=auto "
            "(continue where there is a checkpoint, else start: a sweep's missing jobs), or drop resume to start a "
            "fresh run.")
    return path


def finished_results(run_dir: Path, config: dict) -> dict | None:
    """The results of a run that finished in `run_dir` (its results.json is final, run_folder.finished), or
    None. CheckpointError when they are of another configuration: resume=auto then continues nothing."""
    results = run_folder.read_results(run_dir)
    if results is None or not run_folder.finished(results):
        return None
    saved = {k.removeprefix("config/"): v for k, v in results.items() if k.startswith("config/")}
    if problems := _config_problems(saved, flatten(config), "results.json"):
        raise CheckpointError(
            f"{run_dir / 'results.json'} is of another run: {'; '.join(problems)}. Fix: resume=auto with the "
            "overrides of the run (or sweep) that wrote it (its config: <its run dir>/.hydra/config.yaml), or a "
            "fresh hydra.run.dir (hydra.sweep.dir).")
    log.info("resume=auto: %s has finished (results: %s); nothing to do", run_dir, run_dir / "results.json")
    return results


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Global RNG states as weights_only-loadable containers (numpy's key as a list of ints)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def warm_start_state(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """{layer name: [U_m]} of every ASI/WASI layer that has warm-start factors (CPU copies)."""
    states = {name: layer.warm_start_state() for name, layer in _subspace_layers(model).items()}
    return {name: [u.detach().cpu() for u in factors] for name, factors in states.items() if factors}


def check_finite(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, path: Path, advice: str = "") -> None:
    """NonFiniteWeightsError if any weight or optimizer state is NaN/inf (then `path` is not overwritten);
    `advice` (which files hold what, the fixes) ends its message."""
    tensors = {**model.state_dict(), **_optimizer_tensors(optimizer)}
    if bad := [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]:
        raise NonFiniteWeightsError(f"weights are NaN/inf after step {step} (e.g. {bad[:3]}); {path.name} was not "
                                    f"written. {advice}".rstrip())


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    """A state_dict as safetensors (best.safetensors), atomically (a full disk: DiskFullError, the previous
    file intact)."""
    with atomic(path, resume_fix(path.parent)) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, progress: Progress,
         warm_start: list[dict[str, list[torch.Tensor]]], config: dict) -> None:
    """Write the checkpoint atomically (temp file, fsync, os.replace): a crash or a full disk (DiskFullError)
    mid-write leaves the previous file intact. warm_start: one `warm_start_state` per rank, in rank order.
    Refuses NaN/inf weights or optimizer state (check_finite), keeping the previous file."""
    check_finite(model, optimizer, progress.step, path)
    checkpoint = {
        "format": FORMAT, "version": VERSION,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "progress": asdict(progress), "rng": rng_state(), "warm_start": warm_start,
        "world_size": len(warm_start), "config": config,
    }
    with atomic(path, resume_fix(path.parent)) as tmp:
        torch.save(checkpoint, tmp)
    log.info("checkpoint: %s (epoch %d, step %d)", path, progress.epoch, progress.step)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, config: dict,
         rank: int = 0, world_size: int = 1) -> Progress:
    """Restore model, optimizer, scheduler, this rank's warm-start factors and the RNG states from `path`;
    returns where to continue. CheckpointError (with the fix) if the file is not a checkpoint, was written
    by another configuration or number of processes (nothing loaded), or does not fit what the loaders
    expect (the run must stop: the objects may be partly loaded)."""
    ckpt = read(path)
    problems = _config_problems(flatten(ckpt["config"]), flatten(config))
    if ckpt["world_size"] != world_size:
        problems.append(f"it was written by {ckpt['world_size']} processes, this run has {world_size} "
                        f"(trainer.batch_size is per process, so the global batch would change)")
    if problems:
        raise CheckpointError(
            f"{path} does not belong to this run: {'; '.join(problems)}. Fix: resume with the same overrides (and "
            "number of processes) as the run that wrote it (its config: <its run dir>/.hydra/config.yaml), or start "
            "a fresh run without resume / in a new hydra.run.dir.")
    try:
        progress = Progress(**ckpt["progress"])
        load_model_state(model, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        layers = _subspace_layers(model)
        for name, factors in ckpt["warm_start"][rank].items():
            layers[name].load_warm_start_state([u.to(_device(layers[name])) for u in factors])
        set_rng_state(ckpt["rng"])
    except Exception as err:  # whatever a loader rejects: another model, method, optimizer, or a damaged entry
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:500]
        raise CheckpointError(
            f"{path} does not fit this run ({reason}). Fix: resume with the overrides of the run that wrote it "
            "(<its run dir>/.hydra/config.yaml), or start a fresh run without resume.") from err
    log.info("resumed from %s: epoch %d, batch %d, step %d", path, progress.epoch, progress.batch, progress.step)
    return progress


def carry_best(ckpt_path: Path, best_path: Path, progress: Progress) -> None:
    """Resuming from a checkpoint in another folder: copy that run's best-validation weights along, as
    they are the weights behind progress.best_acc (the test split is evaluated on them at the end). When
    they are gone, Checkpointing.best_lost says so."""
    source = ckpt_path.parent / best_path.name
    if progress.best_acc < 0 or best_path.exists() or source.resolve() == best_path.resolve() or \
            not source.is_file():
        return
    shutil.copyfile(source, best_path)
    log.info("copied %s to %s", source, best_path)


def read(path: Path) -> dict[str, Any]:
    """The checkpoint dict, loaded with weights_only=True; CheckpointError if it is not one of ours."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, not a torch file at all. Only torch's first
        # sentence: the rest suggests weights_only=False, which this project never does (hence `from None`)
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {str(err).split('. ')[0][:200]}); "
            "it is truncated (killed while copying?) or not written by train.py. Nothing was loaded. Fix: "
            "resume from an intact last.ckpt (train.py writes it atomically), or start a fresh run without resume."
        ) from None
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT and ckpt.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is a {FORMAT} version {ckpt.get('version')} file, written by an earlier train.py; this one reads "
            f"version {VERSION}. Fix: start a fresh run without resume (or resume with the train.py that wrote it).")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a {FORMAT} version {VERSION} file (a weights file, or from another program?). "
            "Fix: resume=true reads <run dir>/last.ckpt written by train.py; for weights only use model.checkpoint=...")
    if damaged := sorted(k for k, kind in ENTRIES.items() if not isinstance(ckpt.get(k), kind)):
        raise CheckpointError(f"{path} lacks {damaged} (or holds something else there): it is damaged. "
                              "Fix: start a fresh run without resume.")
    return ckpt


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_python_state(state["python"]))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _python_state(s: Any) -> tuple:
    """The pickled tuple-of-tuples may come back with lists inside; random.setstate wants tuples."""
    return (s[0], tuple(s[1]), s[2])


def _numpy_state(s: dict[str, Any]) -> tuple:
    return ("MT19937", np.asarray(s["key"], dtype=np.uint32), s["pos"], s["has_gauss"], s["gauss"])


def _config_problems(a: dict, b: dict, saved: str = "checkpoint") -> list[str]:
    """The IDENTITY settings that differ between two flattened configs: `a` saved in a `saved` file, `b` this run's."""
    keys = sorted({k for k in a.keys() | b.keys()
                   if any(k == p or k.startswith(p + ".") for p in IDENTITY) and k not in LOCATIONS})
    return [f"config {k}: {saved} {a.get(k, '<absent>')!r}, this run {b.get(k, '<absent>')!r}"
            for k in keys if a.get(k) != b.get(k)][:10]


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """model.load_state_dict(state), after resizing the "svd"-mode L, R buffers whose rank K changed in
    training (the other shapes must already match)."""
    for key in _svd_factor_keys(model):
        module_name, _, buffer = key.rpartition(".")
        module = model.get_submodule(module_name)
        if getattr(module, buffer).shape != state[key].shape:
            setattr(module, buffer, torch.empty_like(state[key], device=_device(module)))
    model.load_state_dict(state)


def _svd_factor_keys(model: nn.Module) -> set[str]:
    return {f"{name}.{b}" for name, m in model.named_modules()
            if isinstance(m, WSILinear) and m.weight_update == "svd" for b in ("L", "R")}


def _subspace_layers(model: nn.Module) -> dict[str, ASILinear | WSILinear]:
    """ASI, WSI and WASI layers by name (WASILinear is a WSILinear)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (ASILinear, WSILinear))}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"optimizer.{i}.{k}": t for i, entry in enumerate(optimizer.state.values())
            for k, t in entry.items() if isinstance(t, torch.Tensor)}


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
