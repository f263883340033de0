"""The artifact manifest ``a3q.json`` and checking an artifact against it.

The manifest lists every file of the artifact with its size and SHA-256, and is **sealed**: it carries the SHA-256
of its own canonical JSON (``manifest_sha256``), so an edit to the manifest itself (say, to the KV-cache setting it
records) is caught like an edit to the weights. This is integrity, not authenticity: it catches truncation,
corruption and careless edits; someone who rewrites both a file and its hash can still hand you a bad artifact,
which is why remote code should only be trusted from people you trust (README, "Artifacts").

Verification checks sizes first (cheap, catches truncation), then hashes. It also refuses files the manifest does
not list, except a model card (``*.md``) or ``.gitattributes`` that sharing an artifact commonly adds: an extra
``.py`` or ``.safetensors`` would otherwise be read or executed without having been checked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from a3q.atomic import STAGING_MARKER
from a3q.io.json_file import JSONFileError, read_json_file

MANIFEST_NAME = "a3q.json"
FORMAT_VERSION = 2
SEAL_KEY = "manifest_sha256"
_MAX_MANIFEST_BYTES = 256 << 20


class ArtifactError(RuntimeError):
    """An artifact is damaged, edited or incomplete; the message names the file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _canonical_digest(manifest: dict[str, Any]) -> str:
    body = {key: value for key, value in manifest.items() if key != SEAL_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its own digest added."""
    return {**manifest, SEAL_KEY: _canonical_digest(manifest)}


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """``relative path → {bytes, sha256}`` for every file below ``folder`` (a3q's staging marker aside)."""
    return {
        f.relative_to(folder).as_posix(): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.relative_to(folder).as_posix() != STAGING_MARKER
    }


def read_manifest(path: Path | str) -> dict[str, Any] | None:
    """The manifest of an artifact folder, or None when the folder has none (a plain Hugging Face folder).

    A manifest that is not a JSON object is an :class:`ArtifactError`: a damaged artifact is not a plain folder.
    """
    manifest = Path(path) / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        payload = read_json_file(manifest, _MAX_MANIFEST_BYTES)
    except JSONFileError as exc:
        raise ArtifactError(f"{manifest} {exc.reason}; not an a3q manifest") from None
    if not isinstance(payload, dict):
        raise ArtifactError(f"{manifest}: expected a JSON object, got {type(payload).__name__}")
    problem = manifest_shape_problem(payload)
    if problem:
        raise ArtifactError(f"{manifest}: {problem}; not an a3q manifest as written by export")
    return payload


class _FileRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int | None = Field(None, ge=0)


class _Weights(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    files: list[str] = []
    shards: int = Field(0, ge=0)
    index: str | None = None
    max_shard_size: int | None = None


class _Structure(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    history: list[dict[str, Any]] = []
    kv_cache: dict[str, Any] | None = None
    layers: list[dict[str, Any]] = []


class _ManifestShape(BaseModel):
    """The types of the fields a3q reads from a manifest (every reader may then trust them)."""

    model_config = ConfigDict(extra="allow", strict=True)
    format: int | None = Field(None, ge=1)
    a3q_version: str | None = None
    recipe: dict[str, Any] | None = None
    report: list[dict[str, Any]] | None = None
    structure: _Structure | None = None
    weights: _Weights | None = None
    files: dict[str, _FileRecord | str]
    manifest_sha256: str | None = None


def manifest_shape_problem(payload: dict[str, Any]) -> str | None:
    """Why ``payload`` does not have the types of an a3q manifest (the first field at fault), or None."""
    try:
        _ManifestShape.model_validate(payload)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "manifest"
        value = repr(error.get("input"))[:60]
        return f"field '{where}': {error['msg']} (got {value})"
    return None


def _listed(manifest: dict[str, Any], where: Path) -> dict[str, dict[str, Any]]:
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{where / MANIFEST_NAME}: no 'files' list; not an a3q manifest")
    records = {}
    for name, record in files.items():
        if isinstance(record, str):  # format 1: the hash alone
            record = {"sha256": record}
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise ArtifactError(f"{where / MANIFEST_NAME}: malformed entry for '{name}'")
        records[name] = record
    return records


def _unlisted_is_allowed(name: str) -> bool:
    return name == ".gitattributes" or (name.endswith(".md") and "/" not in name)


def unlisted_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Files below ``folder`` that the manifest does not list (and that are not a model card)."""
    listed = set(_listed(manifest, folder))
    present = [f.relative_to(folder).as_posix() for f in sorted(folder.rglob("*")) if f.is_file() or f.is_symlink()]
    return [name for name in present if name != MANIFEST_NAME and name not in listed and not _unlisted_is_allowed(name)]


def verify_artifact(folder: Path | str, manifest: dict[str, Any] | None = None, hashes: bool = True) -> dict[str, Any]:
    """Check ``folder`` against its manifest; raise :class:`ArtifactError` naming the first bad file.

    ``hashes=False`` checks the seal, presence and sizes only (what recipe validation does before a run).
    Returns the manifest.
    """
    folder = Path(folder)
    manifest = manifest if manifest is not None else read_manifest(folder)
    if manifest is None:
        raise ArtifactError(f"{folder}: no {MANIFEST_NAME}; not an a3q artifact")
    if SEAL_KEY in manifest:
        if manifest[SEAL_KEY] != _canonical_digest(manifest):
            raise ArtifactError(f"{folder / MANIFEST_NAME}: edited after export (its {SEAL_KEY} does not match its content)")
    elif int(manifest.get("format", 0) or 0) >= 2:
        raise ArtifactError(f"{folder / MANIFEST_NAME}: the seal ({SEAL_KEY}) is missing")
    records = _listed(manifest, folder)
    for name, record in records.items():
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise ArtifactError(f"{folder / MANIFEST_NAME}: lists '{name}', which is outside the artifact")
        if not path.is_file() or path.is_symlink():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if "bytes" in record and size != record["bytes"]:
            what = "truncated" if size < record["bytes"] else "longer than exported"
            raise ArtifactError(f"{path}: {what} ({size:,} bytes, the manifest says {record['bytes']:,})")
    extra = unlisted_files(folder, manifest)
    if extra:
        raise ArtifactError(f"{folder / extra[0]}: not listed in the manifest (added after export?)")
    if hashes:
        for name, record in records.items():
            if sha256_file(folder / name) != record["sha256"]:
                raise ArtifactError(f"{folder / name}: content differs from the export (SHA-256 mismatch)")
    return manifest


def replace_refusal(folder: Path) -> str | None:
    """Why the existing ``folder`` must not be replaced by an export, or None when it is an a3q artifact.

    Only a folder whose manifest is readable and lists every file in it (model cards aside) is ours to replace;
    anything else, including an artifact someone added files to, is refused.
    """
    if not folder.is_dir():
        return f"'{folder}' exists and is not a folder; refusing to overwrite it"
    if not any(folder.iterdir()):
        return None
    try:
        manifest = read_manifest(folder)
        extra = unlisted_files(folder, manifest) if manifest is not None else None
    except ArtifactError:
        manifest, extra = None, None
    if manifest is None or extra is None:
        return f"'{folder}' exists and is not an a3q artifact; refusing to overwrite it"
    if extra:
        return f"'{folder}' is an a3q artifact but holds files it did not export ({extra[0]}); refusing to overwrite it"
    return None
