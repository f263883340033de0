"""Where a3q keeps prepared offline assets.

Assets (the converted model, the cleaned corpus) are derived from pip-installed files once and cached. Folders and
files are written atomically (:mod:`a3q.atomic`).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The asset cache: ``$A3Q_CACHE_DIR`` if set, else ``~/.cache/a3q``."""
    root = Path(os.environ.get("A3Q_CACHE_DIR", Path.home() / ".cache" / "a3q"))
    root.mkdir(parents=True, exist_ok=True)
    return root
