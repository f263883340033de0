"""Checks on a model folder that cost no model load: run by recipe validation, before anything heavy.

A folder that would fail an hour into a run (or, worse, load half-initialised) is refused here with one line naming
the file: a ``config.json`` that is not JSON or names an unsupported family, weights that are missing, pickled or
truncated (the safetensors header says how long the data must be; every shard a ``model.safetensors.index.json``
names is checked, and a missing shard is a problem), a missing tokenizer, and an a3q artifact whose
files do not match its manifest's sizes (the hashes are checked when it loads).
"""

from __future__ import annotations

import json
from pathlib import Path

from a3q.io.manifest import ArtifactError, read_manifest, verify_artifact
from a3q.io.shards import SINGLE_WEIGHTS, WEIGHTS_INDEX, ShardIndexError, read_index

_MAX_CONFIG_BYTES = 16 << 20
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")


def _read_json(path: Path) -> tuple[object | None, str | None]:
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        return None, f"{path.name} is larger than {_MAX_CONFIG_BYTES >> 20} MiB"
    try:
        return json.loads(path.read_bytes().decode("utf-8")), None
    except UnicodeDecodeError:
        return None, f"{path.name} is not UTF-8 text"
    except (json.JSONDecodeError, RecursionError) as exc:
        return None, f"{path.name} is not valid JSON ({exc})"


class HeaderError(ValueError):
    """A safetensors file's header is missing, damaged or describes more data than the file holds."""


def read_header(path: Path) -> dict:
    """``path``'s safetensors header (tensor name → dtype, shape, offsets; ``__metadata__``), reading no tensor data;
    raises :class:`HeaderError` when the file is not complete safetensors."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise HeaderError(f"{path.name} is truncated ({size} bytes: not even a safetensors header)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise HeaderError(f"{path.name} is truncated or not safetensors (header of {header_len:,} bytes in a "
                              f"{size:,}-byte file)")
        try:
            header = json.loads(handle.read(header_len).decode("utf-8"))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, AttributeError, KeyError, TypeError, IndexError):
            raise HeaderError(f"{path.name} has a damaged safetensors header") from None
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        raise HeaderError(f"{path.name} is truncated ({size:,} bytes; its header describes {needed:,})")
    return header


def _safetensors_header(path: Path) -> tuple[set[str], str | None]:
    """The tensor names in ``path``'s header and why the file is not complete safetensors (None when it is)."""
    try:
        header = read_header(path)
    except HeaderError as exc:
        return set(), str(exc)
    return {key for key in header if key != "__metadata__"}, None


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (header unreadable, data shorter than it says), or None."""
    return _safetensors_header(path)[1]


def _weights_problem(folder: Path) -> str | None:
    """Every safetensors file a load may read must be complete: each shard the index names (a missing one is a
    problem, and so is a tensor the index places in a shard that does not hold it), and ``model.safetensors``, which
    transformers prefers when both are there."""
    try:
        weight_map = read_index(folder)
    except ShardIndexError as exc:
        return str(exc)
    if weight_map is not None:
        files = [folder / shard for shard in sorted(set(weight_map.values()))]
        if (folder / SINGLE_WEIGHTS).is_file():
            files.append(folder / SINGLE_WEIGHTS)
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [name for name in _PICKLE_WEIGHTS if (folder / name).exists()]
        if pickled:
            return f"only pickled weights ({pickled[0]}); a3q loads safetensors only and never unpickles a file"
        return "no *.safetensors weights"
    for file in files:
        if not file.is_file():
            return f"weights file {file.name} is missing (named in {WEIGHTS_INDEX})"
        keys, problem = _safetensors_header(file)
        if problem:
            return problem
        if weight_map is not None and file.name != SINGLE_WEIGHTS:
            absent = sorted(name for name, shard in weight_map.items() if shard == file.name and name not in keys)
            if absent:
                return f"{WEIGHTS_INDEX} places '{absent[0][:200]}' in {file.name}, which does not hold it"
    return None


def model_folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be loaded as a model, or None. Reads JSON and file headers only."""
    from a3q.arch import supported_model_types

    config_path = folder / "config.json"
    if not config_path.is_file():
        return f"folder '{folder}' has no config.json (not a Hugging Face model folder)"
    config, problem = _read_json(config_path)
    if problem:
        return f"'{folder}': {problem}"
    if not isinstance(config, dict):
        return f"'{folder}': config.json is not a JSON object"
    supported = supported_model_types()
    model_type = config.get("model_type")
    if model_type not in supported:
        return f"'{folder}': model_type {model_type!r} is not supported (supported: {', '.join(supported)})"
    try:
        manifest = read_manifest(folder)
        if manifest is not None:
            verify_artifact(folder, manifest, hashes=False)
    except ArtifactError as exc:
        return str(exc)
    problem = _weights_problem(folder)
    if problem:
        return f"'{folder}': {problem}"
    if not any(all((folder / name).is_file() for name in group) for group in _TOKENIZER_FILES):
        return f"'{folder}': no tokenizer (tokenizer.json, tokenizer.model, or vocab.json + merges.txt)"
    return None
