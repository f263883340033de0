"""Writing folders and files so that nothing a user had is ever lost.

Every folder a3q writes (an artifact, a prepared model) goes through :func:`atomic_directory`:

* the target path is **resolved once**, and that resolved path is the one checked, locked and replaced
  (``out/x/../v`` is ``out/v`` everywhere, so a check cannot pass on one path while the write replaces another);
* a **lock** on the target (``flock`` on a sibling ``.NAME.a3q-lock``) makes a second writer fail at once with a
  clear message instead of racing the rename; the kernel drops it if the process dies;
* the new content is written into a hidden **staging** sibling marked as a3q's, and renamed into place only when
  complete; a replaced folder is first checked with ``may_replace`` (under the lock, just before the rename) and
  then moved aside and deleted;
* staging folders that an interrupted run left behind (recognised by the marker inside, never by name alone) are
  removed by the next writer of the same target;
* files and folders get the permissions of the user's umask, like ``save_pretrained`` (not mkdtemp's 0700).

:func:`write_json_atomic` and :func:`write_safetensors_atomic` do the same for one file (temporary sibling +
``fsync`` + ``os.replace``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STAGING_MARKER = ".a3q-staging"


class TargetBusyError(RuntimeError):
    """Another process is writing the same target right now."""


class UnsafeTargetError(RuntimeError):
    """The target exists and may not be replaced (it is not ours)."""


def _umask() -> int:
    """The process umask, read without changing it (Linux), else by the classic set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything below it the modes a normal ``open``/``mkdir`` would have (0666/0777 & ~umask)."""
    mask = _umask()
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def target_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock for writing ``target`` (a resolved path)."""
    lock_path = target.with_name(f".{target.name}.a3q-lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TargetBusyError(f"'{target}' is being written by another a3q process; wait for it or choose another path")
        try:  # the lock file may have been unlinked by a finishing holder between our open and flock: retry
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


def _remove_stale_staging(target: Path) -> None:
    """Delete hidden staging/old folders of ``target`` that an interrupted a3q run left (marker required)."""
    for candidate in target.parent.glob(f".{target.name}.*"):
        if candidate.is_dir() and not candidate.is_symlink() and (candidate / STAGING_MARKER).is_file():
            shutil.rmtree(candidate, ignore_errors=True)


def _explain_disk_full(exc: OSError, staging: Path, target: Path, expected_bytes: int | None) -> OSError:
    if exc.errno != errno.ENOSPC:
        return exc
    written = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file()) if staging.exists() else 0
    needed = f"; it needs about {expected_bytes:,} bytes" if expected_bytes else ""
    return OSError(errno.ENOSPC, f"disk full while writing '{target}' ({written:,} bytes written{needed}, "
                   f"{shutil.disk_usage(target.parent).free:,} free); nothing was replaced and the partial copy was removed")


@contextlib.contextmanager
def atomic_directory(
    target: Path | str, may_replace: Callable[[Path], str | None] | None = None, expected_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a staging folder that replaces ``target`` only if the block completes.

    ``may_replace(resolved_target)`` returns why an existing target must not be replaced (or None); it runs under
    the lock, both before the block and again right before the swap. At every instant either the old or the new
    complete folder exists at ``target``. ``expected_bytes`` only improves the message of a full disk.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)

    def check() -> None:
        if target.exists() and may_replace is not None:
            reason = may_replace(target)
            if reason:
                raise UnsafeTargetError(reason)

    with target_lock(target):
        check()
        _remove_stale_staging(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        (staging / STAGING_MARKER).touch()
        try:
            yield staging
            (staging / STAGING_MARKER).unlink()
            apply_umask(staging)
            check()
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise _explain_disk_full(exc, staging, target, expected_bytes) from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        old = None
        if target.exists() or target.is_symlink():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            if old.is_dir() and not old.is_symlink():
                (old / STAGING_MARKER).touch()  # so a crash before the delete below is cleaned up next time
        os.replace(staging, target)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


def write_json_atomic(path: Path | str, payload: Any) -> None:
    """Write JSON to ``path`` through a temporary sibling and an atomic rename (mode from the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_safetensors_atomic(path: Path | str, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """Write a safetensors file to ``path`` through a synced temporary sibling and an atomic rename: a reader (a
    resumed run) finds the old file or the new one, never half of one."""
    from safetensors.torch import save_file  # deferred: only the writers of tensor files need it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
