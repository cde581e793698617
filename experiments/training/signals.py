"""Stopping a run cleanly on SIGINT/SIGTERM (Ctrl-C, SLURM preemption): checkpoint first, then exit."""
from __future__ import annotations

import signal
import threading
from typing import Any


class TrainingInterrupted(SystemExit):
    """SIGINT/SIGTERM: a checkpoint was written and the run stopped; exit status 128 + signal number."""


class StopRequest:
    """While entered, SIGINT and SIGTERM only set `signum`: the loop checkpoints at the next step
    boundary and raises TrainingInterrupted (exit status 128 + signum: 130, 143). A second SIGINT
    (Ctrl-C twice) stops at once. `release()` (and exit) restore the previous handlers; off the main
    thread it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

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
            signal.signal(signum, self._previous[signum])
            signal.raise_signal(signum)
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
