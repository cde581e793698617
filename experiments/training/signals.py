"""Stopping a run cleanly on SIGINT/SIGTERM (Ctrl-C, SLURM preemption): checkpoint first, then exit."""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch

from experiments.training.distributed import Context, all_sum

log = logging.getLogger(__name__)


class TrainingInterrupted(SystemExit):
    """SIGINT/SIGTERM: a checkpoint was written and the run stopped; exit status 128 + signal number."""


class StopRequest:
    """While entered, SIGINT and SIGTERM only set `signum`: the loop checkpoints at the next step
    boundary and `raise_if_stopping` raises TrainingInterrupted (exit status 128 + signum: 130, 143).
    A second SIGINT (Ctrl-C twice) stops at once. `release()` (and exit) restore the previous handlers;
    off the main thread it does nothing.

    Under torchrun a signal may reach one process only: `agree` tells every process, so all stop at the
    same step boundary.
    """

    def __init__(self, ctx: Context = Context()) -> None:
        self.ctx = ctx
        self.signum: int | None = None
        self.stopping = False  # some process was asked to stop (as of the last `agree`)
        self._previous: dict[int, Any] = {}
        self._at_once = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    @property
    def requested(self) -> bool:
        """This process got SIGINT or SIGTERM."""
        return self.signum is not None

    def agree(self, loss: torch.Tensor) -> float:
        """The step's loss averaged over processes; sets `stopping` if any process was asked to stop. One
        collective per step, so every process sees the same loss (a NaN anywhere stops all) and stops at the
        same step boundary."""
        if not self.ctx.distributed:
            self.stopping = self.requested
            return loss.item()
        total, stops = all_sum([loss.item(), float(self.requested)], self.ctx, loss.device)
        self.stopping = stops > 0
        return total / self.ctx.world_size

    def raise_if_stopping(self, step: int, how_to_resume: str) -> None:
        """TrainingInterrupted (after a warning naming the signal, the step and `how_to_resume`) if `stopping`."""
        if not self.stopping:
            return
        signum = self.signum or signal.SIGTERM  # another process may have got the signal
        log.warning("stopped by %s at step %d; %s", signal.Signals(signum).name, step, how_to_resume)
        raise TrainingInterrupted(128 + signum)

    @contextlib.contextmanager
    def at_once(self) -> Iterator[None]:
        """While inside, a signal stops the run there and then instead of at the next step boundary: for a wait
        with nothing new to checkpoint (W&B starting, which would otherwise finish its wait first). A signal
        that came earlier stops it on entry. SIGINT raises KeyboardInterrupt (experiments.training.errors says
        what the run folder holds), SIGTERM TrainingInterrupted (exit status 143)."""
        self._at_once = True
        try:
            if self.signum is not None:
                raise KeyboardInterrupt
            yield
        except KeyboardInterrupt:
            if self.signum is None or self.signum == signal.SIGINT:
                raise
            log.warning("stopped by %s before the next training step (nothing new to checkpoint)",
                        signal.Signals(self.signum).name)
            raise TrainingInterrupted(128 + self.signum) from None
        finally:
            self._at_once = False

    def release(self) -> None:
        """Training is over: restore the previous handlers, and deliver a signal that came after the last
        step boundary (with them, e.g. SIGTERM terminates)."""
        if self._restore() and self.signum is not None:
            signal.raise_signal(self.signum)

    def _restore(self) -> bool:
        previous, self._previous = self._previous, {}
        for s, handler in previous.items():
            signal.signal(s, handler)
        return bool(previous)

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            previous = self._previous[signum]
            signal.signal(signum, previous)
            if not callable(previous):  # SIGINT was ignored or default (a background job): still stop at once
                raise KeyboardInterrupt
            signal.raise_signal(signum)
        self.signum = signum
        if self._at_once:
            raise KeyboardInterrupt
