"""Whom a checkpoint belongs to: one recipe (less the fields that do not change results) and one model folder.

The model's fingerprint covers config.json and each weight file's name, size and safetensors header (shapes, dtypes
and offsets, not the data), so a 140 GB model is not read to start a run.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

from a3q.checkpoint.fields import short

#: recipe fields that may change between a run and its resume
RESUMABLE_CHANGES = ("output", "checkpoint_every", "checkpoint_minutes")


def recipe_identity(raw: dict[str, Any]) -> dict[str, Any]:
    """The recipe as a checkpoint must match it."""
    return {key: value for key, value in raw.items() if key not in RESUMABLE_CHANGES}


def model_fingerprint(folder: Path) -> str:
    """SHA-256 over config.json and each weight file's name, size and safetensors header."""
    digest = hashlib.sha256()
    config = folder / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode() + struct.pack("<Q", path.stat().st_size))
        with path.open("rb") as handle:
            length = struct.unpack("<Q", handle.read(8) or b"\0" * 8)[0]
            digest.update(handle.read(min(length, 1 << 26)))
    return digest.hexdigest()


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Where two recipe identities differ, by field (stages by index and field)."""
    problems = []
    for key in sorted(set(saved) | set(current), key=str):
        before, after = saved.get(key), current.get(key)
        if before == after:
            continue
        if key == "stages" and isinstance(before, list) and isinstance(after, list):
            for index in range(max(len(before), len(after))):
                old = before[index] if index < len(before) else None
                new = after[index] if index < len(after) else None
                if old != new:
                    problems.append(f"stages[{index}]: {short(old)} → {short(new)}")
        else:
            problems.append(f"{key}: {short(before)} → {short(after)}")
    return problems
