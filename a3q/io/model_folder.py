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

from a3q.arch import supported_model_types
from a3q.assets.cache import cache_dir
from a3q.assets.models import MODEL_ALIASES, HubModelError, looks_like_hub_id, resolve_hub_model
from a3q.io.json_file import JSONFileError, read_json_file
from a3q.io.manifest import ArtifactError, read_manifest, verify_artifact
from a3q.io.shards import SINGLE_WEIGHTS, WEIGHTS_INDEX, ShardIndexError, read_index

MAX_CONFIG_BYTES = 16 << 20
MAX_TOKENIZER_BYTES = 64 << 20  # Gemma 3's tokenizer.json is 33 MB
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")


def _read_json(path: Path, limit: int = MAX_CONFIG_BYTES) -> tuple[object | None, str | None]:
    try:
        return read_json_file(path, limit), None
    except JSONFileError as exc:
        return None, str(exc)


class ModelFolderError(ValueError):
    """A model folder cannot be loaded (:func:`model_folder_problem` says why, naming the file)."""


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
        if not file.exists() and not file.is_symlink():
            where = f" (named in {WEIGHTS_INDEX})" if weight_map is not None else ""
            return f"weights file {file.name} is missing{where}"
        problem = file_problem(folder, file.name)
        if problem:
            return f"weights file {problem}"
        keys, problem = _safetensors_header(file)
        if problem:
            return problem
        if weight_map is not None and file.name != SINGLE_WEIGHTS:
            absent = sorted(name for name, shard in weight_map.items() if shard == file.name and name not in keys)
            if absent:
                return f"{WEIGHTS_INDEX} places '{absent[0][:200]}' in {file.name}, which does not hold it"
    return None


#: tokenizer files that are JSON (checked as JSON before a tokenizer is built from them)
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json")
_MAX_TOKENIZER_BYTES = 256 << 20


def _trusted_root(folder: Path) -> Path:
    """Where the files of ``folder`` may live: the folder itself, or for a Hugging Face cache snapshot
    (``models--org--name/snapshots/REV``) the repository's cache folder, whose ``blobs/`` the snapshot links into."""
    resolved = folder.resolve()
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
        return resolved.parent.parent
    return resolved


def file_problem(folder: Path, name: str) -> str | None:
    """Why ``folder/name`` (which exists or is a link) cannot be read as a model file: a symlink that leads outside
    the folder (or its Hub cache repository), or something that is not a regular file (a FIFO, a device, a folder)."""
    path = folder / name
    try:
        if path.is_symlink():
            target = path.resolve()
            root = _trusted_root(folder)
            if target != root and root not in target.parents:
                return f"{name} is a symlink to '{target}', outside the model folder; a3q does not follow it"
        if not path.is_file():
            return f"{name} is not a regular file"
    except (OSError, RuntimeError) as exc:  # a symlink loop, a path we may not read
        return f"{name} cannot be read ({getattr(exc, 'strerror', None) or exc})"
    return None


def _tokenizer_problem(folder: Path) -> str | None:
    """The tokenizer's files: one complete set present, each a regular file in the folder, JSON files valid JSON."""
    present = [name for group in _TOKENIZER_FILES for name in group if (folder / name).exists()
               or (folder / name).is_symlink()]
    present += [name for name in _TOKENIZER_JSON if name not in present and ((folder / name).exists()
                                                                           or (folder / name).is_symlink())]
    for name in present:
        problem = file_problem(folder, name)
        if problem:
            return problem
        if name in _TOKENIZER_JSON:
            _, problem = _read_json(folder / name, _MAX_TOKENIZER_BYTES)
            if problem:
                return problem
    if not any(all((folder / name).is_file() for name in group) for group in _TOKENIZER_FILES):
        return "no tokenizer (tokenizer.json, tokenizer.model, or vocab.json + merges.txt)"
    return None


def model_folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be loaded as a model, or None. Reads JSON and file headers only."""
    config_path = folder / "config.json"
    if not config_path.exists() and not config_path.is_symlink():
        return f"folder '{folder}' has no config.json (not a Hugging Face model folder)"
    problem = file_problem(folder, "config.json")
    if problem:
        return f"'{folder}': {problem}"
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
    if (folder / WEIGHTS_INDEX).exists() or (folder / WEIGHTS_INDEX).is_symlink():
        problem = file_problem(folder, WEIGHTS_INDEX)
        if problem:
            return f"'{folder}': {problem}"
    problem = _weights_problem(folder)
    if problem:
        return f"'{folder}': {problem}"
    problem = _tokenizer_problem(folder)
    return f"'{folder}': {problem}" if problem else None


def check_model_reference(model: str, revision: str | None = None) -> str | None:
    """Return why ``model`` cannot be loaded, or None: used by recipe validation (no model loading).

    A Hub id is resolved here (from the cache, or downloaded when online) and its snapshot folder checked.
    """
    if model in MODEL_ALIASES:
        return None
    if looks_like_hub_id(model):
        try:
            folder = resolve_hub_model(model, revision)
        except HubModelError as exc:
            return str(exc)
        problem = model_folder_problem(folder)
        return f"Hub model '{model}': {problem}" if problem else None
    try:
        folder = Path(model)
        if not folder.is_dir():
            return f"'{model}' is neither a known alias ({', '.join(MODEL_ALIASES)}) nor an existing folder"
        return model_folder_problem(folder)
    except OSError as exc:  # a name too long for the file system, a folder we may not read, ...
        return f"'{model[:200]}': {exc.strerror or exc}"


def _folder(reference: str, revision: str | None) -> Path:
    """Where a model reference's files are on disk (nothing is prepared or downloaded)."""
    if reference in MODEL_ALIASES:
        return cache_dir() / "models" / reference  # a bundled model not prepared yet: nothing to read
    if looks_like_hub_id(reference):
        return resolve_hub_model(reference, revision)
    return Path(reference).expanduser()


def config_json(reference: str, revision: str | None = None) -> dict | None:
    """A model reference's ``config.json`` without loading (or preparing) anything; None when it is not on disk."""
    try:
        config = read_json_file(_folder(reference, revision) / "config.json", MAX_CONFIG_BYTES)
    except (OSError, JSONFileError, RuntimeError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def tokenizer_vocabulary(reference: str, revision: str | None = None) -> dict[int, str] | None:
    """Token id → token of a model's ``tokenizer.json`` (the model's vocabulary and the added tokens), without
    loading a tokenizer; None when there is no readable one. Why the tokens and not the file: an a3q artifact
    re-saves its tokenizer, so the same vocabulary can come in a file with other bytes."""
    try:
        data = read_json_file(_folder(reference, revision) / "tokenizer.json", MAX_TOKENIZER_BYTES)
        vocab = data["model"]["vocab"]
        if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token → id
            tokens = {int(index): str(token) for token, index in vocab.items()}
        else:  # Unigram: [token, score] in id order
            tokens = {index: str(entry[0]) for index, entry in enumerate(vocab)}
        tokens.update({int(added["id"]): str(added["content"]) for added in data.get("added_tokens") or []})
    except (OSError, JSONFileError, RuntimeError, ValueError, KeyError, TypeError, IndexError):
        return None
    return tokens


def text_field(config: dict | None, name: str) -> int | None:
    """An integer field of a config.json (top level, or its ``text_config`` for multimodal wrappers)."""
    if not config:
        return None
    for place in (config, config.get("text_config") or {}):
        if isinstance(place, dict) and isinstance(place.get(name), int) and not isinstance(place.get(name), bool):
            return place[name]
    return None


def vocab_size(config: dict | None) -> int | None:
    """The vocabulary a config.json declares."""
    return text_field(config, "vocab_size")
