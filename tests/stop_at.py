"""Tests choose where a run stops: :class:`SignalAt` sends this process a real signal at one named safe point.

``SignalAt("group1.layer5:TERM")`` sends SIGTERM when layer 5 of stage group 1 is finished, before its checkpoint;
``group1.layer5:KILL`` SIGKILLs the process right after that checkpoint is written; ``group1.plan:TERM`` stops after
planning stages planned; ``group1:KILL`` kills after the checkpoint of the completed group 1. In a data-parallel run
every rank reaches the point; ``…:TERM@1`` signals rank 1 only (the ranks then agree to stop:
:mod:`a3q.checkpoint.ranks`).

How a test gives it to a run (:class:`a3q.checkpoint.stops.StopPoints`; a real run has none):

* one pass: ``StopSignals(points=SignalAt(...))``;
* ``run_recipe`` in this process: ``with stop_points(SignalAt(...)): run_recipe(...)``;
* a whole ``a3q run`` in a child process: ``python -m tests.stop_at run RECIPE ...`` with ``A3Q_TEST_STOP_AT`` set to
  the point (:func:`command` builds it). This module is the command line then, and with ``--nproc N`` every rank runs
  it too, so each reads the variable here, in test code.
"""

from __future__ import annotations

import os
import signal
import sys

from a3q import cli, distributed
from a3q.checkpoint.stops import stop_points

#: the stop point of a child ``a3q run`` started through this module
VARIABLE = "A3Q_TEST_STOP_AT"
MODULE = "tests.stop_at"


class SignalAt:
    """A :class:`~a3q.checkpoint.stops.StopPoints` hook that sends a signal at ``POINT:SIGNAL[@RANK]``."""

    def __init__(self, spec: str) -> None:
        where, _, name = spec.rpartition(":")
        name, _, rank = name.partition("@")
        if not where or name not in ("TERM", "INT", "KILL"):
            raise ValueError(f"'{spec}' is not POINT:TERM|INT|KILL[@RANK]")
        self.point, self.signal, self.rank = where, name, int(rank) if rank else None

    def reached(self, point: str, after_checkpoint: bool) -> None:
        if point != self.point or (self.signal == "KILL") != after_checkpoint:
            return
        if self.rank is None or self.rank == distributed.rank():
            os.kill(os.getpid(), getattr(signal, f"SIG{self.signal}"))


def command(*arguments: str) -> list[str]:
    """``python -m tests.stop_at ARGUMENTS``: the ``a3q`` command line with the stop point of ``A3Q_TEST_STOP_AT``."""
    return [sys.executable, "-m", MODULE, *arguments]


def main() -> None:
    cli.RANK_MODULE = MODULE  # with --nproc N, the ranks run this module too
    spec = os.environ.get(VARIABLE)
    if not spec:
        cli.app(prog_name="a3q")
        return
    with stop_points(SignalAt(spec)):
        cli.app(prog_name="a3q")


if __name__ == "__main__":
    main()
