"""The checkpoint folder of a run (``OUT/checkpoint``): its files, how they are written, whom they belong to.

```
checkpoint/
  .a3q-checkpoint              marker: the folder is a3q's to replace (``--restart``) and to remove after success
  checkpoint.json              the manifest, written last and atomically: the commit point of every checkpoint
  model/                       the model after the last completed stage group (a sealed a3q artifact)
  pass-GG/layer-LLLLL.safetensors   each finished layer of the pass in progress (stage group GG), written once
  pass-GG/state-LLLLL.safetensors   after layer LLLLL: the next layer's inputs, stage states' tensors, RNG states
```

Every file is written to a temporary sibling and renamed into place; the manifest records each file's size and is
replaced only after the files it names exist, so a kill at any moment leaves the previous checkpoint whole. A full
disk removes the temporary file and says how many bytes were needed.

A checkpoint belongs to one recipe and one model: the manifest holds the recipe (without the fields that do not
change results: ``output`` and the checkpoint cadence) and a fingerprint of the model folder (config.json, and each
weight file's name, size and safetensors header: shapes, dtypes and offsets, not the data, so that a 140 GB model is
not read to start a run).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

from torch import Tensor

from a3q import __version__
from a3q.io.atomic import write_json_atomic

FORMAT_VERSION = 1
MANIFEST_NAME = "checkpoint.json"
MARKER_NAME = ".a3q-checkpoint"
#: recipe fields that may change between a run and its resume
RESUMABLE_CHANGES = ("output", "checkpoint_every", "checkpoint_minutes")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used; the message says which file and what to do."""


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
                    problems.append(f"stages[{index}]: {_short(old)} → {_short(new)}")
        else:
            problems.append(f"{key}: {_short(before)} → {_short(after)}")
    return problems


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` as safetensors at ``path`` through a temporary sibling; returns the file's size."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            needed = sum(t.numel() * t.element_size() for t in tensors.values())
            free = shutil.disk_usage(path.parent).free
            raise CheckpointError(
                f"disk full while writing checkpoint file '{path}' (needs about {needed:,} bytes, {free:,} free); "
                "the previous checkpoint is intact: free space and resume with --resume") from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def read_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


#: the only names a manifest may give files and folders: nothing outside the checkpoint folder is ever read,
#: replaced or deleted because a manifest said so
_FILE_NAME = re.compile(r"pass-\d{2}/(layer|state)-\d{5}\.safetensors")
_MODEL_FOLDER = re.compile(r"model-\d{2}")


def _names_problem(manifest: dict[str, Any]) -> str | None:
    names = list(manifest.get("files", {}))
    saved_pass = manifest.get("pass") or {}
    names += [record.get("file", "") for record in saved_pass.get("layers", {}).values() if isinstance(record, dict)]
    names += [saved_pass["state_file"]] if "state_file" in saved_pass else []
    for name in names:
        if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
            return f"file name {name!r} is not one a3q writes"
    folder = manifest.get("model_folder")
    if folder is not None and (not isinstance(folder, str) or not _MODEL_FOLDER.fullmatch(folder)):
        return f"model folder {folder!r} is not one a3q writes"
    return None


class CheckpointFolder:
    """``OUT/checkpoint``: the manifest, the files it lists, and whose they are."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def is_ours(self) -> bool:
        return (self.root / MARKER_NAME).is_file()

    def read(self) -> dict[str, Any]:
        """The manifest, after checking that every file it lists is there at its recorded size."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"'{self.manifest_path}' cannot be read ({exc}); start over with --restart") from exc
        problem = _names_problem(manifest) if isinstance(manifest, dict) else "not a JSON object"
        if problem:
            raise CheckpointError(f"'{self.manifest_path}': {problem}; start over with --restart")
        if manifest.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"'{self.manifest_path}' has format {manifest.get('format')!r}, this a3q reads "
                                  f"{FORMAT_VERSION}; start over with --restart")
        for name, size in manifest.get("files", {}).items():
            path = self.root / name
            if not path.is_file():
                raise CheckpointError(f"checkpoint file '{path}' is missing; start over with --restart")
            if path.stat().st_size != size:
                raise CheckpointError(f"checkpoint file '{path}' has {path.stat().st_size:,} bytes, the manifest "
                                      f"says {size:,}; start over with --restart")
        return manifest

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / MARKER_NAME).touch()

    def commit(self, manifest: dict[str, Any]) -> None:
        """Replace the manifest (the files it names must already be written)."""
        write_json_atomic(self.manifest_path, {"format": FORMAT_VERSION, "a3q_version": __version__, **manifest})

    def size(self) -> int:
        return sum(path.stat().st_size for path in self.root.rglob("*") if path.is_file())

    def remove(self) -> None:
        """Delete the folder, which must carry a3q's marker."""
        if self.root.exists():
            if not self.is_ours():
                raise CheckpointError(f"'{self.root}' exists but was not made by a3q (no {MARKER_NAME}); "
                                      "not removing it: move it away or choose another --out")
            shutil.rmtree(self.root)
