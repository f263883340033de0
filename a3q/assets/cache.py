"""Where a3q keeps prepared offline assets.

Assets (the converted model, the cleaned corpus) are derived from pip-installed files once and cached. Folders and
files are written atomically by :mod:`a3q.io.atomic` (re-exported here for the asset code).
"""

from __future__ import annotations

import os
from pathlib import Path

from a3q.io.atomic import atomic_directory, write_json_atomic

__all__ = ["atomic_directory", "cache_dir", "write_json_atomic"]


def cache_dir() -> Path:
    """The asset cache: ``$A3Q_CACHE_DIR`` if set, else ``~/.cache/a3q``."""
    root = Path(os.environ.get("A3Q_CACHE_DIR", Path.home() / ".cache" / "a3q"))
    root.mkdir(parents=True, exist_ok=True)
    return root
