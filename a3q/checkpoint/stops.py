"""Clean stops: SIGINT/SIGTERM end a run at the next safe point, with a checkpoint and one line on how to resume.

While the pipeline works through a layer, the first signal is only recorded (:meth:`StopSignals.deferred`); the
pass checkpoints the finished layer and raises :class:`RunStopped` (:meth:`StopSignals.stop_if_requested`).
Elsewhere (loading, a training stage) and on a second signal, :class:`RunStopped` is raised at once: the last
checkpoint written stays the resume point.

Every safe point tells :meth:`StopSignals.reached` its name (``group1.layer5``, ``group1.plan``, ``group1``), before
its checkpoint and after it. That does nothing in a run; tests give a run a :class:`StopPoints` hook there to stop it
at a chosen point (``StopSignals(points=...)``, or :func:`stop_points` around a whole run: ``tests/stop_at.py``).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from a3q import distributed

_HANDLED = (signal.SIGINT, signal.SIGTERM)


class RunStopped(BaseException):
    """The run was stopped by a signal; the message says where and how to resume.

    A ``BaseException``, like ``KeyboardInterrupt``: code that catches ``Exception`` (a loader trying alternatives)
    must not turn a stop into an ordinary failure."""

    def __init__(self, signal_name: str, message: str = "", agreed: bool = False, resumable: bool = False) -> None:
        self.signal_name = signal_name
        self.agreed = agreed  # a distributed run: every rank stops at this same point (a3q.checkpoint.ranks.agree)
        self.resumable = resumable  # said by the engine: whether a checkpoint to resume from exists
        super().__init__(message or f"stopped by {signal_name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number."""
        return 128 + int(getattr(signal, self.signal_name, signal.SIGTERM))


class StopPoints(Protocol):
    """A test's hook at the run's safe points (:meth:`StopSignals.reached`)."""

    def reached(self, point: str, after_checkpoint: bool) -> None:
        """The run is at ``point``: before its checkpoint (``after_checkpoint`` False) or right after it."""


#: the hook of every run started inside :func:`stop_points` (tests only; None in a real run)
_installed_points: StopPoints | None = None


@contextmanager
def stop_points(points: StopPoints) -> Iterator[None]:
    """Tests: every :class:`StopSignals` made inside (every run started here) calls ``points`` at its safe points."""
    global _installed_points
    previous, _installed_points = _installed_points, points
    try:
        yield
    finally:
        _installed_points = previous


class StopSignals:
    """Installs SIGINT/SIGTERM handlers for the duration of a ``with`` block (main thread only).

    ``points``: a test's hook at the safe points (default: the one :func:`stop_points` installed, if any)."""

    def __init__(self, points: StopPoints | None = None) -> None:
        self.points = points if points is not None else _installed_points
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

    def reached(self, point: str, after_checkpoint: bool) -> None:
        """A safe point (see the module docstring): a test's hook may stop the run here."""
        if self.points is not None:
            self.points.reached(point, after_checkpoint)

    def stop_if_requested(self, where: str, checkpoint: Path | None) -> None:
        """At a safe point, once every rank agreed on :attr:`requested` (:func:`a3q.checkpoint.ranks.agree`): stop the
        run there, saying ``where`` and the ``checkpoint`` folder (None: checkpoints are off)."""
        if self.requested is None:
            return
        saved = f"; checkpoint in '{checkpoint}'" if checkpoint is not None else " (checkpoints are off)"
        raise RunStopped(self.requested, f"stopped by {self.requested} {where}{saved}",
                         agreed=distributed.world_size() > 1)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside: the first signal is recorded in :attr:`requested` instead of raised."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
