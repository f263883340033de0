"""The checkpoint folder of a run (``OUT/checkpoint``): its files, how they are written and sealed, whom they belong to.

```
checkpoint/
  .a3q-checkpoint              marker: the folder is a3q's to replace (``--restart``) and to remove after success
  checkpoint.json              the manifest, sealed, written last and atomically: the commit point of every checkpoint
  model-GG/                    the model after the last completed stage group GG that changed it (a sealed artifact)
  pass-GG/layer-LLLLL.safetensors   each finished layer of the pass in progress (stage group GG), written once
  pass-GG/state-LLLLL.safetensors   after layer LLLLL: the next layer's inputs, stage states' tensors, RNG states
```

Every file is written to a temporary sibling and renamed into place; the manifest records each file's size and
SHA-256 (the model folder's files included) and is **sealed** like an artifact's manifest (``manifest_sha256``: the
digest of its own canonical JSON, :func:`a3q.io.manifest.seal`). It is replaced only after the files it names exist,
so a kill at any moment leaves the previous checkpoint whole. Reading a checkpoint checks the seal, every file's size
and hash, and every field (:mod:`a3q.checkpoint.consistency`): an edited, truncated or inconsistent checkpoint is
refused naming the file (and the field). A full disk removes the temporary file and says how many bytes were needed.

**What is a3q's.** a3q follows no symbolic link inside the folder and deletes only what it wrote: the files a sealed
manifest lists, files and folders with the names it gives them (``pass-GG/`` and its layer and state files,
``model-GG/`` holding a sealed artifact's files, temporary and staging siblings) and the marker. Anything else found
there (a user's file, a symbolic link, a folder a3q does not make) is refused by name before anything is read,
written or deleted (:meth:`CheckpointFolder.inventory`).

A checkpoint belongs to one recipe and one model: the manifest holds the recipe (without the fields that do not
change results: ``output`` and the checkpoint cadence) and a fingerprint of the model folder (config.json, and each
weight file's name, size and safetensors header: shapes, dtypes and offsets, not the data, so that a 140 GB model is
not read to start a run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from a3q import __version__
from a3q.atomic import STAGING_MARKER, write_json_atomic
from a3q.checkpoint.fields import MODEL_FOLDER, PASS_FOLDER, RESTART, CheckpointError, check_fields, name_problem, short
from a3q.io.manifest import MANIFEST_NAME as ARTIFACT_MANIFEST
from a3q.io.manifest import SEAL_KEY, ArtifactError, read_manifest, seal, sha256_file, verify_artifact

#: 2: every file's size and SHA-256 (the model folder's files too), a sealed manifest (``manifest_sha256``), every
#: field present. 1 (sizes only, unsealed) is refused.
FORMAT_VERSION = 2
MANIFEST_NAME = "checkpoint.json"
MARKER_NAME = ".a3q-checkpoint"
_MAX_MANIFEST_BYTES = 256 << 20


def is_sealed(manifest: Any) -> bool:
    """Whether ``manifest`` (a checkpoint's or an artifact's) carries a seal that matches its content."""
    return isinstance(manifest, dict) and manifest.get(SEAL_KEY) == seal(
        {key: value for key, value in manifest.items() if key != SEAL_KEY})[SEAL_KEY]


_PASS_ENTRY = re.compile(r"(layer|state)-\d{5}\.safetensors|\.(layer|state)-\d{5}\.safetensors\.tmp")
_OWN_TOP_FILE = re.compile(r"\.checkpoint\.json\.\w+|\.model-\d{2}\.a3q-lock")  # manifest temporaries, save locks
_STAGING = re.compile(r"\.model-\d{2}\.(tmp-\w+|old-\d+)")  # a3q.atomic's staging / replaced folders


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as :func:`a3q.atomic.write_json_atomic` writes it (what :meth:`CheckpointFolder.commit`
    writes), byte for byte."""
    return (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _is(path: Path, kind: Callable[[int], bool]) -> bool:
    info = _lstat(path)
    return info is not None and kind(info.st_mode)


class CheckpointFolder:
    """``OUT/checkpoint``: the manifest, the files it lists, and whose they are."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def present(self) -> bool:
        """Whether anything (a folder, a file, a link) is at the folder's path."""
        return _lstat(self.root) is not None

    def exists(self) -> bool:
        """Whether something is at the manifest's path (a link there is refused, by name, when it is read)."""
        return _lstat(self.manifest_path) is not None

    def is_ours(self) -> bool:
        return _is(self.root, stat.S_ISDIR) and _is(self.root / MARKER_NAME, stat.S_ISREG)

    # -- what is in the folder ------------------------------------------------------------------------------------
    def _not_ours(self, path: Path, what: str) -> CheckpointError:
        return CheckpointError(f"'{path}' is {what}, which a3q did not write: a3q never follows, writes through or "
                               f"deletes anything it did not write in its checkpoint folder; move it out of "
                               f"'{self.root}' and run again")

    def check_root(self) -> None:
        """Refuse a link, or a non-folder, at the folder's path, and a link in place of the marker."""
        info = _lstat(self.root)
        if info is not None and stat.S_ISLNK(info.st_mode):
            raise self._not_ours(self.root, "a symbolic link")
        if info is not None and not stat.S_ISDIR(info.st_mode):
            raise CheckpointError(f"'{self.root}' exists and is not a folder; move it away or choose another --out")
        if info is not None and _is(self.root / MARKER_NAME, stat.S_ISLNK):
            raise self._not_ours(self.root / MARKER_NAME, "a symbolic link")

    def listed_names(self) -> set[str]:
        """The files a sealed manifest lists (none when the manifest is missing, unreadable or not sealed)."""
        info = _lstat(self.manifest_path)
        if info is None or not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_MANIFEST_BYTES:
            return set()
        try:
            manifest = json.loads(self.manifest_path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return set()
        files = manifest.get("files") if is_sealed(manifest) else None
        return {name for name in files if name_problem(name) is None} if isinstance(files, dict) else set()

    def inventory(self) -> list[tuple[Path, str]]:
        """Every entry of the folder as ``(path, "file" | "folder" | "staging")``, children before their folder.

        Raises :class:`CheckpointError` naming the first entry a3q did not write: a symbolic link anywhere (the
        folder itself included), a file or folder with a name a3q does not give, a file in a model folder that
        neither that artifact's sealed manifest nor the checkpoint's lists. Reads no content but the manifests.
        """
        self.check_root()
        if not self.present():
            return []
        listed = self.listed_names()
        found: list[tuple[Path, str]] = []
        for entry in sorted(os.scandir(self.root), key=lambda item: item.name):
            path, name = Path(entry.path), entry.name
            if entry.is_symlink():
                raise self._not_ours(path, "a symbolic link")
            if entry.is_file(follow_symlinks=False) and (name in (MARKER_NAME, MANIFEST_NAME)
                                                         or _OWN_TOP_FILE.fullmatch(name)):
                found.append((path, "file"))
            elif entry.is_dir(follow_symlinks=False) and PASS_FOLDER.fullmatch(name):
                for sub in sorted(os.scandir(path), key=lambda item: item.name):
                    if sub.is_symlink():
                        raise self._not_ours(Path(sub.path), "a symbolic link")
                    if not (sub.is_file(follow_symlinks=False) and _PASS_ENTRY.fullmatch(sub.name)):
                        raise self._not_ours(Path(sub.path), "not a file a3q writes into a pass folder")
                    found.append((Path(sub.path), "file"))
                found.append((path, "folder"))
            elif entry.is_dir(follow_symlinks=False) and MODEL_FOLDER.fullmatch(name):
                allowed = {ARTIFACT_MANIFEST} | {item[len(name) + 1:] for item in listed if item.startswith(name + "/")}
                try:
                    artifact = read_manifest(path) if _is(path / ARTIFACT_MANIFEST, stat.S_ISREG) else None
                except (ArtifactError, OSError):
                    artifact = None
                if is_sealed(artifact) and isinstance(artifact.get("files"), dict):
                    allowed |= set(artifact["files"])
                found += self._artifact_entries(path, path, allowed)
            elif (entry.is_dir(follow_symlinks=False) and _STAGING.fullmatch(name)
                  and _is(path / STAGING_MARKER, stat.S_ISREG)):
                found.append((path, "staging"))
            else:
                raise self._not_ours(path, "not a file or folder a3q writes")
        return found

    def _artifact_entries(self, top: Path, folder: Path, allowed: set[str]) -> list[tuple[Path, str]]:
        found: list[tuple[Path, str]] = []
        for entry in sorted(os.scandir(folder), key=lambda item: item.name):
            path = Path(entry.path)
            if entry.is_symlink():
                raise self._not_ours(path, "a symbolic link")
            if entry.is_dir(follow_symlinks=False):
                found += self._artifact_entries(top, path, allowed)
            elif entry.is_file(follow_symlinks=False) and path.relative_to(top).as_posix() in allowed:
                found.append((path, "file"))
            else:
                raise self._not_ours(path, f"not listed by the manifest of the checkpointed model '{top.name}'")
        found.append((folder, "folder"))
        return found

    # -- reading --------------------------------------------------------------------------------------------------
    def read(self) -> dict[str, Any]:
        """The manifest, checked: readable, this a3q's format, sealed, every field present and of its type
        (:func:`a3q.checkpoint.consistency.check_fields`). The files it lists: :meth:`verify_files`."""
        path = self.manifest_path
        info = _lstat(path)
        if info is None or not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"'{path}' is missing or not a regular file; {RESTART}")
        if info.st_size > _MAX_MANIFEST_BYTES:
            raise CheckpointError(f"'{path}' is larger than {_MAX_MANIFEST_BYTES >> 20} MiB, not a3q's; {RESTART}")
        try:
            raw = path.read_bytes()
            manifest = json.loads(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"'{path}' cannot be read ({exc}); {RESTART}") from None
        if not isinstance(manifest, dict):
            raise CheckpointError(f"'{path}' is not a JSON object; {RESTART}")
        version = manifest.get("format")
        if version != FORMAT_VERSION:
            older = isinstance(version, int) and not isinstance(version, bool) and version < FORMAT_VERSION
            raise CheckpointError(
                f"'{path}' " + (f"was written by an older a3q (checkpoint format {version}: sizes only, unsealed); "
                                if older else f"has format {short(version)}; ")
                + f"this a3q reads checkpoint format {FORMAT_VERSION}: {RESTART}")
        if SEAL_KEY not in manifest:
            raise CheckpointError(f"'{path}': its seal ({SEAL_KEY}) is missing; {RESTART}")
        if not is_sealed(manifest):
            raise CheckpointError(f"'{path}': edited after it was written (its {SEAL_KEY} does not match its "
                                  f"content); {RESTART}")
        if raw != _manifest_bytes(manifest):  # the seal covers the content; this, every byte (spacing included)
            raise CheckpointError(f"'{path}': edited after it was written (its bytes are not the JSON a3q wrote); "
                                  f"{RESTART}")
        check_fields(manifest, path)
        return manifest

    def verify_files(self, manifest: dict[str, Any]) -> None:
        """Every file the manifest lists is a regular file (no link on the way) of the recorded size and SHA-256,
        and the model folder is the sealed artifact the manifest recorded (sizes first, then hashes)."""
        files: dict[str, dict[str, Any]] = manifest["files"]
        for name, record in files.items():
            path = self.root / name
            for parent in reversed(Path(name).parents[:-1]):
                if not _is(self.root / parent, stat.S_ISDIR):
                    raise CheckpointError(f"checkpoint folder '{self.root / parent}' is missing, a symbolic link or "
                                          f"not a folder; {RESTART}")
            info = _lstat(path)
            if info is None or not stat.S_ISREG(info.st_mode):
                raise CheckpointError(f"checkpoint file '{path}' is " + ("missing" if info is None else
                                                                          "not a regular file") + f"; {RESTART}")
            if info.st_size != record["bytes"]:
                what = "truncated" if info.st_size < record["bytes"] else "longer than written"
                raise CheckpointError(f"checkpoint file '{path}' is {what} ({info.st_size:,} bytes, the manifest "
                                      f"says {record['bytes']:,}); {RESTART}")
        for name, record in files.items():
            if sha256_file(self.root / name) != record["sha256"]:
                raise CheckpointError(f"checkpoint file '{self.root / name}': content differs from what was written "
                                      f"(SHA-256 mismatch); {RESTART}")
        if manifest["model_folder"] is not None:
            self._verify_model(manifest["model_folder"], files)

    def _verify_model(self, name: str, files: dict[str, dict[str, Any]]) -> None:
        """The model folder's ``a3q.json`` was hashed with the rest: its records must be the checkpoint's, its seal
        valid, and the folder must hold nothing else (:func:`a3q.io.manifest.verify_artifact`)."""
        folder = self.root / name
        try:
            artifact = read_manifest(folder)
            records = artifact.get("files") if artifact is not None else None
            if not isinstance(records, dict):
                raise ArtifactError(f"{folder / ARTIFACT_MANIFEST}: missing, or no 'files' list")
            expected = {f"{name}/{ARTIFACT_MANIFEST}"} | {f"{name}/{item}" for item in records}
            listed = {item for item in files if item.startswith(name + "/")}
            for item in sorted(expected ^ listed):
                raise ArtifactError(f"{self.root / item}: listed by " + (
                    "the model's manifest but not the checkpoint's" if item in expected else
                    "the checkpoint's manifest but not the model's"))
            for item, record in records.items():
                mine = files[f"{name}/{item}"]
                if not isinstance(record, dict) or (record.get("bytes"), record.get("sha256")) != (
                        mine["bytes"], mine["sha256"]):
                    raise ArtifactError(f"{folder / item}: the model's manifest and the checkpoint's record different "
                                        "contents")
            verify_artifact(folder, artifact, hashes=False)  # the seal; no file it does not list
        except ArtifactError as exc:
            raise CheckpointError(f"checkpointed model: {exc}; {RESTART}") from None

    # -- writing --------------------------------------------------------------------------------------------------
    def create(self) -> None:
        """The folder and its marker (a link, or a non-folder, at the folder's path is refused)."""
        self.check_root()
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / MARKER_NAME
        info = _lstat(marker)
        if info is not None and not stat.S_ISREG(info.st_mode):
            raise self._not_ours(marker, "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a3q's marker")
        if info is None:
            marker.touch()

    def own_folder(self, name: str) -> Path:
        """``root/name`` as a folder of a3q's: created when absent, refused when a link or not a folder."""
        path = self.root / name
        info = _lstat(path)
        if info is not None and (stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode)):
            raise self._not_ours(path, "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a folder")
        if info is None:
            path.mkdir()
        return path

    def refuse_link(self, name: str) -> None:
        """Refuse a link at ``root/name`` (before a writer that resolves its target path writes there)."""
        if _is(self.root / name, stat.S_ISLNK):
            raise self._not_ours(self.root / name, "a symbolic link")

    def remove_file(self, name: str) -> None:
        """Delete a file a3q wrote; a link or anything but a regular file is refused, and left."""
        path = self.root / name
        info = _lstat(path)
        if info is None:
            return
        if not stat.S_ISREG(info.st_mode):
            raise self._not_ours(path, "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file")
        path.unlink()

    def commit(self, manifest: dict[str, Any]) -> None:
        """Replace the manifest, sealed (the files it names must already be written)."""
        body = {key: value for key, value in manifest.items() if key not in (SEAL_KEY, "format", "a3q_version")}
        write_json_atomic(self.manifest_path, seal({"format": FORMAT_VERSION, "a3q_version": __version__, **body}))

    def size(self) -> int:
        total = 0
        for folder, _, names in os.walk(self.root):  # follows no link
            for name in names:
                info = _lstat(Path(folder) / name)
                total += info.st_size if info is not None and stat.S_ISREG(info.st_mode) else 0
        return total

    def remove(self, which: Callable[[str], bool] | None = None) -> None:
        """Delete the folder (it must carry a3q's marker), or only the top-level entries whose name ``which``
        accepts, once :meth:`inventory` found nothing a3q did not write. The manifest goes first (the folder is then
        no checkpoint), the marker last (a removal cut short is finished by the next one)."""
        if not self.present():
            return
        self.check_root()
        if not self.is_ours():
            raise CheckpointError(f"'{self.root}' exists but was not made by a3q (no {MARKER_NAME}); "
                                  "not removing it: move it away or choose another --out")
        entries = self.inventory()
        if which is None:
            self.manifest_path.unlink(missing_ok=True)
        for path, kind in entries:
            top = path.relative_to(self.root).parts[0]
            if top in (MANIFEST_NAME, MARKER_NAME) or (which is not None and not which(top)):
                continue
            if kind == "file":
                path.unlink(missing_ok=True)
            elif kind == "folder":
                path.rmdir()
            else:  # a3q.atomic's staging folder (its marker inside): rmtree unlinks links, never follows them
                shutil.rmtree(path)
        if which is None:
            (self.root / MARKER_NAME).unlink(missing_ok=True)
            self.root.rmdir()
