"""The offload store's private folders: made beside the run's output, marked as a3q's, removed with the model, and
removed by the next run when a killed process (``kill -9`` runs no cleanup) left one behind.

A folder is named ``.a3q-offload-XXXX`` and holds the marker :data:`STORE_MARKER` (the creating process's pid, its
start time and host) and layer files (:mod:`a3q.layer_store.layer_file`), each written through a temporary sibling.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

STORE_PREFIX = ".a3q-offload-"
#: written inside every store when it is created: who made it (pid, its start time, host)
STORE_MARKER = ".a3q-offload-store"
#: the files a3q writes in a store: layer files, and the temporary siblings a killed write leaves
_STORE_FILE = re.compile(r"layer-\d{5}\.safetensors|\.layer-\d{5}\.safetensors\.tmp")


def remove_store_folder(store: Path) -> None:
    """Delete this process's offload store (only folders a3q made, named with :data:`STORE_PREFIX`)."""
    if store.name.startswith(STORE_PREFIX) and not store.is_symlink():
        shutil.rmtree(store, ignore_errors=True)


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux), or None when unknown."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _creator() -> dict[str, Any]:
    return {"pid": os.getpid(), "start": _process_start(os.getpid()), "host": socket.gethostname()}


def _still_running(creator: dict[str, Any]) -> bool:
    """Whether the process that made a store still runs on this machine (its pid AND start time: pids are reused).
    A store made on another machine is stale: the run that holds the output folder's lock is the only one using it."""
    pid = creator.get("pid")
    if creator.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    start = _process_start(pid)
    if start is not None or Path("/proc/self/stat").exists():
        return start is not None and start == creator.get("start")
    try:  # no /proc: the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def layer_file_name(index: int) -> str:
    return f"layer-{index:05d}.safetensors"


def remove_stale_offload_stores(folder: Path) -> list[Path]:
    """Delete the offload stores a killed run left in ``folder`` (``kill -9`` skips every cleanup); returns them.

    A store is removed only when it is a3q's and stale: a real folder (not a symbolic link) named
    ``.a3q-offload-*``, holding a3q's marker (:data:`STORE_MARKER`, a regular file) and nothing but a3q's layer files,
    whose creating process no longer runs. Anything else, a look-alike without the marker included, is left alone.
    Call it while holding the output folder's run lock (:mod:`a3q.io.run_lock`): no other run then uses a store there.
    """
    removed: list[Path] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda item: item.name)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if not entry.name.startswith(STORE_PREFIX) or entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
            continue
        store = Path(entry.path)
        marker = store / STORE_MARKER
        try:
            if not stat.S_ISREG(os.lstat(marker).st_mode) or os.lstat(marker).st_size > 4096:
                continue
            creator = json.loads(marker.read_text())
            contents = list(os.scandir(store))
        except (OSError, ValueError):
            continue
        if not isinstance(creator, dict) or _still_running(creator):
            continue
        if not all(item.is_file(follow_symlinks=False)
                   and (item.name == STORE_MARKER or _STORE_FILE.fullmatch(item.name)) for item in contents):
            continue  # holds something a3q does not write there: not a3q's to delete
        for item in contents:
            if item.name != STORE_MARKER:
                os.unlink(item.path)
        marker.unlink()  # last: a removal cut short is finished next time
        store.rmdir()
        removed.append(store)
    return removed


def new_store(near: Path | str | None) -> Path:
    """A fresh, private folder for offloaded layers, beside the run's output when there is one (the disk of its
    checkpoint, whose pass files then link the store's layer files instead of writing them again), marked as a3q's
    (:data:`STORE_MARKER`) so that the next run in that folder removes it if this process is killed."""
    if near is not None:
        near = Path(near)
        near.mkdir(parents=True, exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix=STORE_PREFIX, dir=near))
    (store / STORE_MARKER).write_text(json.dumps(_creator()))
    return store
