"""Clean stops: SIGINT/SIGTERM end a run at the next safe point, with a checkpoint and one line on how to resume.

While the pipeline works through a layer, the first signal is only recorded (:meth:`StopSignals.deferred`); the
pass checkpoints the finished layer and raises :class:`RunStopped`. Elsewhere (loading, a training stage) and on a
second signal, :class:`RunStopped` is raised at once: the last checkpoint written stays the resume point.

``A3Q_TEST_STOP_AT`` (tests only) makes the stop points deterministic: ``group1.layer5:TERM`` sends this process
SIGTERM when layer 5 of stage group 1 is finished, before its checkpoint; ``group1.layer5:KILL`` SIGKILLs it right
after that checkpoint is written; ``group1.plan:TERM`` after planning stages planned; ``group1:KILL`` after the
checkpoint of the completed group 1. In a data-parallel run every rank reaches the point; ``…:TERM@1`` signals rank 1
only (the ranks then agree to stop: :mod:`a3q.checkpoint.ranks`).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

TEST_STOP_VARIABLE = "A3Q_TEST_STOP_AT"
_HANDLED = (signal.SIGINT, signal.SIGTERM)


class RunStopped(BaseException):
    """The run was stopped by a signal; the message says where and how to resume.

    A ``BaseException``, like ``KeyboardInterrupt``: code that catches ``Exception`` (a loader trying alternatives)
    must not turn a stop into an ordinary failure."""

    def __init__(self, signal_name: str, message: str = "") -> None:
        self.signal_name = signal_name
        self.resumable = False  # set by the engine: whether a checkpoint to resume from exists
        self.agreed = False  # a distributed run: every rank stops at this same point (a3q.checkpoint.ranks.agree)
        super().__init__(message or f"stopped by {signal_name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number."""
        return 128 + int(getattr(signal, self.signal_name, signal.SIGTERM))


class StopSignals:
    """Installs SIGINT/SIGTERM handlers for the duration of a ``with`` block (main thread only)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._deferring = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in _HANDLED:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: object) -> None:
        name = signal.Signals(number).name
        if self.requested is None and self._deferring:
            self.requested = name  # the pass stops after the current layer, with a checkpoint
            return
        self.requested = name
        raise RunStopped(name)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside: the first signal is recorded in :attr:`requested` instead of raised."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1


def injected_stop(point: str, after_checkpoint: bool) -> None:
    """Tests only: deliver the signal ``A3Q_TEST_STOP_AT`` names when the run reaches ``point``."""
    wanted = os.environ.get(TEST_STOP_VARIABLE)
    if not wanted or ":" not in wanted:
        return
    where, name = wanted.rsplit(":", 1)
    name, _, rank = name.partition("@")
    if where != point or (name == "KILL") != after_checkpoint or (rank and rank != os.environ.get("RANK", "0")):
        return
    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
