"""One run per output folder: an exclusive lock on ``OUT`` held for the whole run.

Why: two runs with the same ``--out`` share ``report.json``, the checkpoint folder and the offload stores, so the
second one to finish would delete the first one's live checkpoint and overwrite its report. The lock makes the
second run fail at once, naming the run that holds the folder.

How: ``flock`` on ``OUT/.a3q-run.lock``, opened without following a symlink, held by an open file descriptor until
the process ends. The kernel drops the lock when the process dies, however it dies (``kill -9`` included), so a lock
never outlives its run; the file itself stays behind and is harmless (the next run locks it again). The file holds
who has the lock (pid, host, start time, command), read by a refused run for its message.

A data-parallel launch (``a3q run --nproc N``) takes the lock in the launcher and tells its ranks so through
:data:`HELD_ENV`; under a bare ``torchrun`` rank 0 takes it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

LOCK_NAME = ".a3q-run.lock"
#: set by a launcher that holds the lock for the processes it starts: ``<resolved OUT>``
HELD_ENV = "A3Q_RUN_LOCK_HELD"
_MAX_HOLDER_BYTES = 4096


class OutputBusyError(RuntimeError):
    """Another a3q run holds the output folder."""


class OutputFolderError(ValueError):
    """The output folder cannot be used (a file, not creatable, a symlinked lock)."""


def prepare_output_folder(out: Path) -> Path:
    """``out`` resolved and created; refuse (one line) an existing file or a folder that cannot be created."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out: '{out}' exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFolderError(f"--out: cannot create '{out}': {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputFolderError(f"--out: '{out}' is not writable")
    return out


class RunLock:
    """The exclusive lock on one output folder; :meth:`acquire` it, and it lasts until :meth:`release` or exit."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`OutputBusyError` naming the holder (never waits)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if self.path.is_symlink():
                raise OutputFolderError(f"'{self.path}' is a symlink; a3q does not follow it: remove it") from None
            raise OutputFolderError(f"cannot open the run lock '{self.path}': {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputBusyError(f"'{self.out}' is in use by another a3q run ({holder}); wait for it to finish or "
                                  "choose another --out") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)[:1000]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, _MAX_HOLDER_BYTES, 0).decode("utf-8", "replace"))
        return f"pid {int(holder['pid'])} on {str(holder['host'])[:100]}, started {str(holder['started'])[:40]}: " \
               f"{str(holder['command'])[:200]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def held_by_launcher(out: Path) -> bool:
    """Whether a launcher said (:data:`HELD_ENV`) that it holds ``out``'s lock for this process."""
    return os.environ.get(HELD_ENV) == str(Path(out).resolve())
