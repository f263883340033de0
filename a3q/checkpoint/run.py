"""Checkpoints of one run: after every completed stage group, and inside a pipeline pass after every few layers.

:class:`RunCheckpoint` decides at the start whether the run may use ``OUT/checkpoint`` (``--resume`` continues it
when recipe and model match, ``--restart`` discards it, and without either an unfinished checkpoint is never
overwritten). The engine asks it for a :class:`PassCheckpoint` per pipeline pass and calls :meth:`group_done` after
each group; the model after a group is stored as an a3q artifact (sealed, verified when it is loaded back), in a
new folder per group that the manifest names only once it is complete. A resumed checkpoint is checked whole before
the model loads: the manifest's seal, every file's size and SHA-256 (the model folder's too), every field against the
recipe and the model (:mod:`a3q.checkpoint.consistency`), and that the folder holds nothing a3q did not write
(:meth:`~a3q.checkpoint.store.CheckpointFolder.inventory`). Checkpoints inside a pass:
:mod:`a3q.checkpoint.layer_pass`. In a data-parallel run rank 0 alone writes and removes; every rank reads the
checkpoint it resumes from (:mod:`a3q.checkpoint.ranks`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from a3q import distributed
from a3q.checkpoint.consistency import Expected, check_against, check_model_config, check_state_tensors
from a3q.checkpoint.fields import MODEL_FOLDER, PASS_FOLDER, CheckpointError
from a3q.checkpoint.identity import model_fingerprint, recipe_differences, recipe_identity
from a3q.checkpoint.layer_pass import PassCheckpoint
from a3q.checkpoint.ranks import agree
from a3q.checkpoint.stops import StopSignals
from a3q.checkpoint.store import MARKER_NAME, CheckpointFolder, is_sealed
from a3q.checkpoint.tensor_files import file_record
from a3q.io.artifact import save_artifact
from a3q.io.manifest import MANIFEST_NAME, read_manifest

if TYPE_CHECKING:
    from a3q.graph import ModelGraph
    from a3q.recipe import Recipe


class CheckpointRefused(ValueError):
    """The checkpoint folder cannot be used as asked (nothing to resume, another recipe or model, not ours)."""


#: every field a manifest has (a pass checkpoint before the first completed group leaves these as they start)
_START = {"completed_groups": 0, "report_rows": [], "history": None, "model_folder": None, "model_dtype": None,
          "pass": None, "position": "start", "complete": False}


class RunCheckpoint:
    """``OUT/checkpoint`` for one run; see the module docstring."""

    def __init__(self, folder: CheckpointFolder, recipe: Recipe, fingerprint: str, stops: StopSignals,
                 manifest: dict[str, Any] | None) -> None:
        self.folder, self.recipe, self.fingerprint, self.stops = folder, recipe, fingerprint, stops
        self.saved = manifest or {}
        #: file name → {bytes, sha256} of every file written or resumed from (the manifest lists those in use)
        self.records: dict[str, dict[str, Any]] = dict(self.saved.get("files", {}))
        self.writes, self.seconds, self.bytes_written = 0, 0.0, 0
        self.resumed_from = self.saved.get("position") if manifest else None
        self.enabled = recipe.checkpoint_every > 0 or recipe.checkpoint_minutes is not None
        self.owner = True  # False: a rank ≠ 0 of a distributed run, which reads a checkpoint to resume, never writes

    @classmethod
    def open(cls, out: Path, recipe: Recipe, model_folder: Path, resume: bool, restart: bool,
             stops: StopSignals, world_size: int = 1, rank: int = 0) -> RunCheckpoint:
        """Check what ``OUT/checkpoint`` holds against the request, before the model loads.

        A data-parallel run (``world_size`` > 1) checkpoints as one process does, through rank 0 alone: with
        ``resume`` every rank reads and checks the same checkpoint (read-only on ranks ≠ 0); without it, only rank 0
        looks at the folder (it refuses an unfinished checkpoint, or clears a finished one). Nothing of the number
        of processes goes into a checkpoint, so one written by N processes resumes with any other number.
        """
        folder = CheckpointFolder(out / "checkpoint")
        fingerprint = model_fingerprint(model_folder)
        manifest = None
        if resume:
            folder.check_root()
            if not folder.present():
                raise CheckpointRefused(f"--resume: there is no checkpoint in '{folder.root}'; run without --resume")
            if not folder.is_ours():
                raise CheckpointError(f"'{folder.root}' was not made by a3q (no {MARKER_NAME}); not resuming from it")
            folder.inventory()  # nothing there that a3q did not write, no link (reads nothing but manifests)
            if not folder.exists():
                raise CheckpointRefused(f"--resume: there is no checkpoint in '{folder.root}'; run without --resume")
            manifest = folder.read()  # sealed, this format, byte for byte as written, every field of its type
            differences = recipe_differences(manifest["recipe"], recipe_identity(recipe.raw))
            if differences:
                raise CheckpointRefused("--resume: the recipe differs from the checkpoint's: " + "; ".join(differences)
                                        + " (--restart starts over)")
            if manifest["model_fingerprint"] != fingerprint:
                raise CheckpointRefused(f"--resume: model '{recipe.model}' ({model_folder}) is not the model the "
                                        f"checkpoint was made from ('{manifest['model']}'): its config or weight files "
                                        "differ (--restart starts over)")
            expected = Expected.of(recipe, model_folder)
            check_against(manifest, expected, folder.manifest_path)  # positions and lists: before reading any file
            folder.verify_files(manifest)  # sizes, then SHA-256 (the model folder's files too)
            if manifest["model_folder"] is not None:
                check_model_config(folder.root / manifest["model_folder"], expected)
            check_state_tensors(manifest, folder.root)
        elif rank == 0 and folder.present():
            folder.check_root()
            if not folder.is_ours():
                folder.remove()  # refuses: a folder a3q did not make is never read or deleted
            folder.inventory()  # a link or a file a3q did not write is named before anything is read
            if folder.exists() and not restart and not _complete(folder):
                raise CheckpointRefused(f"'{out}' holds the checkpoint of an unfinished run "
                                        f"({_position(folder)}): --resume continues it, --restart discards it")
            folder.remove()  # refuses a folder a3q did not make, and one holding anything a3q did not write
        checkpoint = cls(folder, recipe, fingerprint, stops, manifest)
        checkpoint.owner = rank == 0
        return checkpoint

    # -- what a resumed run starts from -------------------------------------------------------------------------
    @property
    def completed_groups(self) -> int:
        return int(self.saved.get("completed_groups", 0))

    @property
    def report_rows(self) -> list[dict[str, Any]]:
        return list(self.saved.get("report_rows", []))

    def model_path(self) -> Path | None:
        """The model after the last completed group (None: the recipe's model)."""
        name = self.saved.get("model_folder")
        return self.folder.root / name if name else None

    def model_dtype(self) -> str | None:
        return self.saved.get("model_dtype")

    def history(self) -> list[dict[str, Any]] | None:
        """The model's stage history as of the last completed group (None: no group completed)."""
        return self.saved.get("history")

    def pass_checkpoint(self, group: int, label: str) -> PassCheckpoint | None:
        saved = self.saved.get("pass")
        saved = saved if saved and saved.get("group") == group else None
        if not self.enabled and saved is None:
            return None
        return PassCheckpoint(self, group, label, saved)

    # -- writing ------------------------------------------------------------------------------------------------
    def commit(self, **fields: Any) -> None:
        """Write the manifest with ``fields`` changed (the files it names are already written); rank 0 only."""
        if not self.owner:
            return
        self.saved.update(fields)
        self.saved.update(recipe=recipe_identity(self.recipe.raw), model=self.recipe.model,
                          model_fingerprint=self.fingerprint)
        for key, value in _START.items():
            self.saved.setdefault(key, value)
        self.saved["files"] = self._files()
        self.folder.create()
        self.folder.commit(self.saved)
        self.writes += 1

    def _files(self) -> dict[str, dict[str, Any]]:
        """The records of the files the manifest names: the pass's, and the model folder's."""
        names = set()
        saved_pass = self.saved.get("pass")
        if saved_pass:
            names = {record["file"] for record in saved_pass["layers"].values()} | {saved_pass["state_file"]}
        folder = self.saved.get("model_folder")
        names |= {name for name in self.records if folder and name.split("/")[0] == folder}
        return {name: self.records[name] for name in sorted(names)}

    def _model_records(self, name: str) -> None:
        """Records of the model folder just written, taken from its own (sealed) manifest, plus the manifest's."""
        folder = self.folder.root / name
        artifact = read_manifest(folder) or {}
        for item, record in dict(artifact.get("files") or {}).items():
            known = isinstance(record, dict) and {"bytes", "sha256"} <= set(record)
            self.records[f"{name}/{item}"] = ({"bytes": record["bytes"], "sha256": record["sha256"]} if known
                                              else file_record(folder / item))
        self.records[f"{name}/{MANIFEST_NAME}"] = file_record(folder / MANIFEST_NAME)

    def group_done(self, group: int, graph: ModelGraph, rows: list[dict[str, Any]], changed_model: bool,
                   label: str) -> None:
        """After stage group ``group``: store the model (when the group changed it) and the report rows."""
        if not self.enabled:
            return
        # every rank finished the group (and long since read what it resumed from) before rank 0 replaces files
        distributed.barrier()
        started = time.perf_counter()
        with self.stops.deferred():  # a signal now waits for the manifest: then the run stops below
            fields: dict[str, Any] = {"completed_groups": group + 1, "report_rows": rows, "pass": None,
                                      "position": f"after {label}", "history": graph.history}
            if changed_model and self.owner:
                self.folder.create()  # a new folder per group: the manifest names it only once it is complete
                name = f"model-{group:02d}"
                self.folder.refuse_link(name)  # the artifact writer resolves its target: never through a link
                save_artifact(graph, self.folder.root / name, recipe=None, report=rows)
                self._model_records(name)
                self.bytes_written += sum(record["bytes"] for item, record in self.records.items()
                                          if item.split("/")[0] == name)
                fields.update(model_folder=name, model_dtype=str(next(graph.model.parameters()).dtype)
                              .removeprefix("torch."))
            if self.owner:
                self.commit(**fields)
                current = self.saved["model_folder"]
                self.records = {item: record for item, record in self.records.items()
                                if item.split("/")[0] == current}
                # the finished pass and any earlier model folder: only what a3q wrote (else refused, by name)
                self.folder.remove(lambda top: bool(PASS_FOLDER.fullmatch(top))
                                   or bool(MODEL_FOLDER.fullmatch(top)) and top != current)
        self.seconds += time.perf_counter() - started
        self.stops.reached(f"group{group}", after_checkpoint=True)
        self.stops.requested = agree(False, self.stops.requested)[1]  # every rank stops here, or none does
        self.stops.stop_if_requested(f"after {label}", self.folder.root)

    def finish(self, keep: bool) -> None:
        """After a successful run: remove the checkpoint, or mark it complete (``--keep-checkpoint``)."""
        if not self.owner:
            return
        if keep and self.folder.exists():
            self.commit(complete=True, position="complete")
        elif self.folder.present():
            self.folder.remove()

    def summary(self) -> dict[str, Any]:
        """The report's ``checkpoint`` entry."""
        summary: dict[str, Any] = {"folder": str(self.folder.root), "writes": self.writes,
                                   "seconds": round(self.seconds, 3), "bytes_written": self.bytes_written,
                                   "bytes": self.folder.size() if self.folder.is_ours() else 0}
        if self.resumed_from:
            summary["resumed_from"] = self.resumed_from
        return summary


def _complete(folder: CheckpointFolder) -> bool:
    """Whether the folder holds the sealed checkpoint of a finished run (``--keep-checkpoint``)."""
    try:
        manifest = json.loads(folder.manifest_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return is_sealed(manifest) and manifest.get("complete") is True


def _position(folder: CheckpointFolder) -> str:
    try:
        return str(json.loads(folder.manifest_path.read_text()).get("position", "unknown position"))[:200]
    except (OSError, ValueError, RecursionError, AttributeError):
        return "unreadable manifest"
