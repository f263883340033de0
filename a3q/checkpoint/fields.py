"""The names and fields a checkpoint manifest may hold, checked from JSON alone (no recipe, no model).

:mod:`a3q.checkpoint.store` reads and writes checkpoints and :mod:`a3q.checkpoint.consistency` checks them against
the recipe and the model; both start here: the one error type (:class:`CheckpointError`, one line naming the file
and the field), the file names a3q writes (:func:`name_problem`: nothing else is ever read, replaced or deleted
because a manifest said so) and :func:`check_fields` (each field present and of its type).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from a3q.placement import DTYPES

RESTART = "start over with --restart"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used; the message says which file (and field) and what to do."""


def short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


# -- names: the only ones a manifest may list, and the only ones a3q deletes -------------------------------------
PASS_FOLDER = re.compile(r"pass-\d{2}")
MODEL_FOLDER = re.compile(r"model-\d{2}")
_PASS_FILE = re.compile(r"pass-\d{2}/(layer|state)-\d{5}\.safetensors")
_PART = re.compile(r"[A-Za-z0-9_+=-][A-Za-z0-9._+=-]*")


def name_problem(name: Any) -> str | None:
    """Why ``name`` is not one a checkpoint manifest may list (None: it is): a pass file, or a file of a model folder,
    relative and without ``..``, so nothing outside the folder is ever read, replaced or deleted because a manifest
    said so."""
    if isinstance(name, str):
        parts = name.split("/")
        if _PASS_FILE.fullmatch(name) or (len(parts) >= 2 and MODEL_FOLDER.fullmatch(parts[0])
                                          and all(_PART.fullmatch(part) for part in parts[1:])):
            return None
    return f"file name {short(name)} is not one a3q writes"


_HEX = re.compile(r"[0-9a-f]{64}")
#: dtypes a3q loads models in
MODEL_DTYPES = tuple(DTYPES)
#: config lists a stage changes inside a pass (a3q.arch.surgery), restored from a pass checkpoint
LAYER_LISTS = ("qk_head_dims", "vo_head_dims", "intermediate_sizes", "rope_pairs")
#: report columns the engine and the report table read as numbers
_NUMERIC_COLUMNS = ("seconds", "peak_rss_mb", "params", "weight_bytes", "kv_bytes_per_token", "ppl",
                    "shared_pass_seconds")
_REQUIRED = ("a3q_version", "recipe", "model", "model_fingerprint", "files", "completed_groups", "report_rows",
             "history", "model_folder", "model_dtype", "pass", "position", "complete")
_PASS_FIELDS = ("group", "next_layer", "layers", "state_file", "windows_sha256", "dtype", "state", "config")


class _Refusal:
    """Builds the one-line error for a field of the manifest at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"'{self.path}': field '{field}' {problem}; {RESTART}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) or value is None


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# -- types (JSON alone) ------------------------------------------------------------------------------------------
def check_fields(manifest: dict[str, Any], path: Path) -> None:
    """Every field present and of its type; file names only those a3q writes."""
    refuse = _Refusal(path)
    for key in _REQUIRED:
        if key not in manifest:
            raise refuse(key, "is missing")
    for key, kind in (("a3q_version", str), ("recipe", dict), ("model", str), ("position", str), ("files", dict),
                      ("report_rows", list), ("complete", bool)):
        if not isinstance(manifest[key], kind):
            raise refuse(key, f"is {_show(manifest[key])}, not a {_kind(kind)}")
    if not isinstance(manifest["model_fingerprint"], str) or not _HEX.fullmatch(manifest["model_fingerprint"]):
        raise refuse("model_fingerprint", "is not a SHA-256")
    if not _is_int(manifest["completed_groups"]) or manifest["completed_groups"] < 0:
        raise refuse("completed_groups", f"is {_show(manifest['completed_groups'])}, not a count")
    for name, record in manifest["files"].items():
        problem = name_problem(name)
        if problem:
            raise refuse("files", problem)
        if not (isinstance(record, dict) and set(record) == {"bytes", "sha256"} and _is_int(record["bytes"])
                and record["bytes"] >= 0 and isinstance(record["sha256"], str) and _HEX.fullmatch(record["sha256"])):
            raise refuse(f"files.{name}", f"is {_show(record)}, not {{bytes, sha256}}")
    for position, row in enumerate(manifest["report_rows"]):
        where = f"report_rows[{position}]"
        if not isinstance(row, dict) or not isinstance(row.get("stage"), str):
            raise refuse(where, f"is {_show(row)}, not a report row (an object with a 'stage' name)")
        for column in _NUMERIC_COLUMNS:
            if column in row and not _is_number(row[column]):
                raise refuse(f"{where}.{column}", f"is {_show(row[column])}, not a number")
    history = manifest["history"]
    if history is not None:
        if not isinstance(history, list):
            raise refuse("history", f"is {_show(history)}, not a list")
        for position, entry in enumerate(history):
            if not (isinstance(entry, dict) and set(entry) == {"stage", "config"} and isinstance(entry["stage"], str)
                    and isinstance(entry["config"], dict)):
                raise refuse(f"history[{position}]", f"is {_show(entry)}, not {{stage, config}}")
    folder = manifest["model_folder"]
    if folder is not None and not (isinstance(folder, str) and MODEL_FOLDER.fullmatch(folder)):
        raise refuse("model_folder", f"is {_show(folder)}, not a model folder a3q writes")
    if manifest["model_dtype"] not in (None, *MODEL_DTYPES):
        raise refuse("model_dtype", f"is {_show(manifest['model_dtype'])}, not one of {', '.join(MODEL_DTYPES)}")
    if manifest["pass"] is not None:
        _check_pass_fields(manifest["pass"], refuse)


def _kind(kind: type) -> str:
    return {str: "string", dict: "JSON object", list: "list", bool: "true/false"}[kind]


def _check_pass_fields(saved: Any, refuse: _Refusal) -> None:
    if not isinstance(saved, dict):
        raise refuse("pass", f"is {_show(saved)}, not a JSON object")
    for key in _PASS_FIELDS:
        if key not in saved:
            raise refuse(f"pass.{key}", "is missing")
    for key in ("group", "next_layer"):
        if not _is_int(saved[key]) or saved[key] < 0:
            raise refuse(f"pass.{key}", f"is {_show(saved[key])}, not a position")
    for key, kind in (("layers", dict), ("config", dict), ("state", dict)):
        if not isinstance(saved[key], kind):
            raise refuse(f"pass.{key}", f"is {_show(saved[key])}, not a {_kind(kind)}")
    if not isinstance(saved["state_file"], str):
        raise refuse("pass.state_file", f"is {_show(saved['state_file'])}, not a file name")
    sha = saved["windows_sha256"]
    if sha is not None and not (isinstance(sha, str) and _HEX.fullmatch(sha)):
        raise refuse("pass.windows_sha256", "is not a SHA-256")
    if saved["dtype"] not in [f"torch.{name}" for name in MODEL_DTYPES]:
        raise refuse("pass.dtype", f"is {_show(saved['dtype'])}, not one of a3q's dtypes")
    for index, record in saved["layers"].items():
        if not (isinstance(record, dict) and set(record) == {"file", "modules"}
                and isinstance(record["modules"], dict)):
            raise refuse(f"pass.layers.{index}", f"is {_show(record)}, not {{file, modules}}")
    state = saved["state"]
    if set(state) != {"dict"} or not isinstance(state["dict"], dict) or set(state["dict"]) != {"hidden", "stages",
                                                                                               "rng"}:
        raise refuse("pass.state", "is not {hidden, stages, rng}")
    _check_split_state(state, "pass.state", refuse, 0)


def _check_split_state(value: Any, where: str, refuse: _Refusal, depth: int) -> None:
    """The layout :func:`a3q.checkpoint.state.split_tensors` writes: ``{"tensor": name}``, ``{"dict": {...}}``,
    lists and JSON scalars."""
    if depth > 64:
        raise refuse(where, "is nested deeper than checkpoint state is")
    if isinstance(value, dict):
        if set(value) == {"tensor"} and isinstance(value["tensor"], str):
            return
        if set(value) != {"dict"} or not isinstance(value["dict"], dict):
            raise refuse(where, f"is {_show(value)}, not checkpoint state ({{tensor}} or {{dict}})")
        for key, item in value["dict"].items():
            _check_split_state(item, f"{where}.{key}", refuse, depth + 1)
    elif isinstance(value, list):
        for position, item in enumerate(value):
            _check_split_state(item, f"{where}[{position}]", refuse, depth + 1)


# -- against the recipe and the model ---------------------------------------------------------------------------
