"""How a linear's weight is stored, and how many bytes that takes: one lookup for every quantized format.

Each quantized format (a3q's GPTQ linear, bitsandbytes' 4/8-bit linears) registers two functions with
:func:`register_storage`:

* ``describe(module) -> dict | None``: the storage record of a module of that format (``{"method": ..., ...}``),
  or None when the module is not of that format;
* ``stored_bytes(storage, fan_in, fan_out) -> int``: the exact bytes the stored weight occupies, metadata included.

:func:`storage_of` and :func:`weight_bytes` dispatch over the registered formats, so the graph, the report and the
loaders never need to know the formats by name. A float linear (None) is counted at bf16, the usual deployment width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StorageFormat:
    method: str
    describe: Callable[[Any], dict | None]
    stored_bytes: Callable[[dict, int, int], int]


_FORMATS: dict[str, StorageFormat] = {}


def register_storage(method: str, describe: Callable[[Any], dict | None], stored_bytes: Callable[[dict, int, int], int]) -> None:
    """Make ``method`` known to :func:`storage_of` and :func:`weight_bytes` (idempotent)."""
    _FORMATS[method] = StorageFormat(method, describe, stored_bytes)


def _load_builtin_formats() -> None:
    import a3q.quant.formats  # noqa: F401  (importing registers the built-in formats)


def storage_of(module: Any) -> dict | None:
    """The storage record of a linear module, or None for a plain float linear."""
    _load_builtin_formats()
    for storage_format in _FORMATS.values():
        record = storage_format.describe(module)
        if record is not None:
            return record
    return None


def weight_bytes(storage: dict | None, fan_in: int, fan_out: int) -> int:
    """Bytes of one linear's weight (bias excluded): bf16 when float, exact stored bytes when quantized."""
    if storage is None:
        return 2 * fan_in * fan_out
    _load_builtin_formats()
    if storage["method"] not in _FORMATS:
        raise KeyError(f"unknown weight storage '{storage['method']}' (known: {', '.join(sorted(_FORMATS))})")
    return _FORMATS[storage["method"]].stored_bytes(storage, fan_in, fan_out)
