"""Checkpoint files: tensors written through a temporary sibling, their manifest records, and a full disk refused.

Pass checkpoints write each finished layer and each state here (:mod:`a3q.checkpoint.layer_pass`); a full disk
removes the temporary file and becomes one :class:`~a3q.checkpoint.fields.CheckpointError` saying how many bytes
were needed, with the previous checkpoint intact.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

from a3q.checkpoint.fields import CheckpointError
from a3q.io.manifest import sha256_file
from a3q.layer_store.layer_file import save_tensors_atomically


def write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``tensors`` as safetensors at ``path`` through a temporary sibling; returns the file's manifest record
    (:func:`file_record`)."""
    with disk_full_refused(path, lambda: sum(t.numel() * t.element_size() for t in tensors.values())):
        save_tensors_atomically(path, tensors, metadata)
    return file_record(path)


@contextmanager
def disk_full_refused(path: Path, needed: Callable[[], int]) -> Iterator[None]:
    """A full disk while ``path`` is written becomes a :class:`CheckpointError` that says how much was needed (about
    ``needed()`` bytes) and how much is free (the writer removed its temporary file)."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            free = shutil.disk_usage(path.parent).free
            raise CheckpointError(
                f"disk full while writing checkpoint file '{path}' (needs about {needed():,} bytes, {free:,} free); "
                "the previous checkpoint is intact: free space and resume with --resume") from exc
        raise


def read_tensors(path: Path) -> dict[str, Tensor]:
    return load_file(str(path))


def file_record(path: Path) -> dict[str, Any]:
    """A file's manifest record: ``{"bytes", "sha256"}``, as in an artifact's ``a3q.json``."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
