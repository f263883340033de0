"""Sharded safetensors weights: the shard-size limit, and which files hold a folder's weights.

An export writes ``model.safetensors`` when the weights fit in ``max_shard_size``, else transformers' standard sharded
layout: ``model-00001-of-0000N.safetensors`` … plus ``model.safetensors.index.json`` (``metadata.total_size`` and a
``weight_map`` from tensor name to shard file). Every reader in a3q asks :func:`weight_files` which files to read, in
the order transformers itself uses: ``model.safetensors`` if present, else the shards the index names.
"""

from __future__ import annotations

import math
from pathlib import Path

from a3q.io.json_file import JSONFileError, read_json_file

SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
#: transformers' ``save_pretrained(max_shard_size=...)`` default (5.x)
DEFAULT_MAX_SHARD_SIZE = "50GB"
_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}  # huggingface_hub's, decimal like transformers'
_MAX_INDEX_BYTES = 64 << 20


class ShardIndexError(ValueError):
    """``model.safetensors.index.json`` is unreadable or names files outside the folder; the message says which."""


def parse_shard_size(value: int | str) -> int:
    """``"500MB"`` / ``"2GB"`` / ``"1.5GB"`` / an int of bytes → bytes (units as transformers': KB, MB, GB, TB, powers
    of 1000). Raises ValueError for anything else or a size below 1 byte."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected an int of bytes or a size like '500MB', got {type(value).__name__}")
    if isinstance(value, int):
        size = value
    else:
        text = value.strip()
        unit = text[-2:].upper()
        if unit not in _UNITS:
            raise ValueError(f"'{value[:40]}': expected a size like '500MB' or '2GB' (units KB, MB, GB, TB) or an int of bytes")
        try:
            number = float(text[:-2].strip())
        except ValueError:
            raise ValueError(f"'{value[:40]}': '{text[:-2].strip()[:40]}' is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"'{value[:40]}': not a finite size")
        size = int(number * _UNITS[unit])
    if size < 1:
        raise ValueError(f"{value!r}: a shard must hold at least 1 byte")
    return size


def read_index(folder: Path | str) -> dict[str, str] | None:
    """The ``weight_map`` (tensor name → shard file) of ``folder``'s index, or None when it has no index.

    Raises :class:`ShardIndexError` for an index that is not JSON, has no ``weight_map``, or names a file that is not
    directly in ``folder`` (``../x``, ``sub/x``).
    """
    index = Path(folder) / WEIGHTS_INDEX
    if not index.is_file():
        return None
    try:
        payload = read_json_file(index, _MAX_INDEX_BYTES)
    except JSONFileError as exc:
        raise ShardIndexError(str(exc)) from None
    weight_map = payload.get("weight_map") if isinstance(payload, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ShardIndexError(f"{WEIGHTS_INDEX} has no weight_map")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise ShardIndexError(f"{WEIGHTS_INDEX} names '{str(shard)[:200]}' for '{str(name)[:200]}', "
                                  "which is not a file in this folder")
    return weight_map


def index_shards(folder: Path | str) -> list[str] | None:
    """The shard files ``folder``'s index names (sorted, each once), or None when it has no index."""
    weight_map = read_index(folder)
    return None if weight_map is None else sorted(set(weight_map.values()))


def weight_files(folder: Path | str) -> list[Path]:
    """The safetensors files a loader reads for ``folder``'s weights, in transformers' order of preference:
    ``model.safetensors``; else every shard the index names (present or not: a missing one is the caller's error);
    else any ``*.safetensors`` in the folder (other names some tools write). Empty when there are none."""
    folder = Path(folder)
    if (folder / SINGLE_WEIGHTS).is_file():
        return [folder / SINGLE_WEIGHTS]
    shards = index_shards(folder)
    if shards is not None:
        return [folder / shard for shard in shards]
    return sorted(folder.glob("*.safetensors"))
