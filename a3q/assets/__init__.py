"""Offline assets: the bundled real model and the cache they are prepared into."""

from a3q.assets.cache import atomic_directory, cache_dir, write_json_atomic
from a3q.assets.models import MODEL_ALIASES, check_model_reference, resolve_model_path

__all__ = [
    "MODEL_ALIASES",
    "atomic_directory",
    "cache_dir",
    "check_model_reference",
    "resolve_model_path",
    "write_json_atomic",
]
