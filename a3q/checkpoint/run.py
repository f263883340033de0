"""Checkpoints of one run: after every completed stage group, and inside a pipeline pass after every few layers.

:class:`RunCheckpoint` decides at the start whether the run may use ``OUT/checkpoint`` (``--resume`` continues it
when recipe and model match, ``--restart`` discards it, and without either an unfinished checkpoint is never
overwritten). The engine asks it for a :class:`PassCheckpoint` per pipeline pass and calls :meth:`group_done` after
each group; the model after a group is stored as an a3q artifact (sealed, verified when it is loaded back), in a
new folder per group that the manifest names only once it is complete. Checkpoints inside a pass:
:mod:`a3q.checkpoint.layer_pass`. In a data-parallel run rank 0 alone writes and removes; every rank reads the
checkpoint it resumes from (:mod:`a3q.checkpoint.ranks`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from a3q import distributed
from a3q.checkpoint.layer_pass import PassCheckpoint
from a3q.checkpoint.ranks import agree
from a3q.checkpoint.stops import RunStopped, StopSignals, injected_stop
from a3q.checkpoint.store import CheckpointFolder, model_fingerprint, recipe_differences, recipe_identity

if TYPE_CHECKING:
    from a3q.graph import ModelGraph
    from a3q.recipe import Recipe


class CheckpointRefused(ValueError):
    """The checkpoint folder cannot be used as asked (nothing to resume, another recipe or model, not ours)."""


class RunCheckpoint:
    """``OUT/checkpoint`` for one run; see the module docstring."""

    def __init__(self, folder: CheckpointFolder, recipe: Recipe, fingerprint: str, stops: StopSignals,
                 manifest: dict[str, Any] | None) -> None:
        self.folder, self.recipe, self.fingerprint, self.stops = folder, recipe, fingerprint, stops
        self.saved = manifest or {}
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
            if not folder.exists():
                raise CheckpointRefused(f"--resume: there is no checkpoint in '{folder.root}'; run without --resume")
            manifest = folder.read()
            differences = recipe_differences(manifest["recipe"], recipe_identity(recipe.raw))
            if differences:
                raise CheckpointRefused("--resume: the recipe differs from the checkpoint's: " + "; ".join(differences)
                                        + " (--restart starts over)")
            if manifest["model_fingerprint"] != fingerprint:
                raise CheckpointRefused(f"--resume: model '{recipe.model}' ({model_folder}) is not the model the "
                                        f"checkpoint was made from ('{manifest['model']}'): its config or weight files "
                                        "differ (--restart starts over)")
        elif rank == 0 and folder.root.exists():
            if folder.exists() and not restart and not _complete(folder):
                raise CheckpointRefused(f"'{out}' holds the checkpoint of an unfinished run "
                                        f"({_position(folder)}): --resume continues it, --restart discards it")
            folder.remove()  # refuses a folder a3q did not make
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
        self.saved["files"] = _files(self.folder.root, self.saved.get("pass"))
        if not self.folder.is_ours():
            self.folder.create()
        self.folder.commit(self.saved)
        self.writes += 1

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
            previous = self.saved.get("model_folder")
            if changed_model and self.owner:
                from a3q.io.artifact import save_artifact

                self.folder.create()  # a new folder per group: the manifest names it only once it is complete
                model = save_artifact(graph, self.folder.root / f"model-{group:02d}", recipe=None, report=rows)
                self.bytes_written += sum(path.stat().st_size for path in model.iterdir() if path.is_file())
                fields.update(model_folder=model.name, model_dtype=str(next(graph.model.parameters()).dtype)
                              .removeprefix("torch."))
            if self.owner:
                self.commit(**fields)
                stale = list(self.folder.root.glob("pass-*"))
                if previous and previous != self.saved["model_folder"]:
                    stale.append(self.folder.root / previous)
                for path in stale:
                    _remove_tree(path)
        self.seconds += time.perf_counter() - started
        injected_stop(f"group{group}", after_checkpoint=True)
        self.stops.requested = agree(False, self.stops.requested)[1]  # every rank stops here, or none does
        if self.stops.requested:
            stopped = RunStopped(self.stops.requested, f"stopped by {self.stops.requested} after {label}; "
                                                       f"checkpoint in '{self.folder.root}'")
            stopped.agreed = distributed.world_size() > 1
            raise stopped

    def finish(self, keep: bool) -> None:
        """After a successful run: remove the checkpoint, or mark it complete (``--keep-checkpoint``)."""
        if not self.owner:
            return
        if keep and self.folder.exists():
            self.commit(complete=True, position="complete")
        elif self.folder.root.exists():
            self.folder.remove()

    def summary(self) -> dict[str, Any]:
        """The report's ``checkpoint`` entry."""
        summary: dict[str, Any] = {"folder": str(self.folder.root), "writes": self.writes,
                                   "seconds": round(self.seconds, 3), "bytes_written": self.bytes_written,
                                   "bytes": self.folder.size() if self.folder.root.exists() else 0}
        if self.resumed_from:
            summary["resumed_from"] = self.resumed_from
        return summary


def _files(root: Path, saved_pass: dict[str, Any] | None) -> dict[str, int]:
    """Sizes of the pass files the manifest names (the model artifact carries its own sealed manifest)."""
    if not saved_pass:
        return {}
    names = [record["file"] for record in saved_pass["layers"].values()] + [saved_pass["state_file"]]
    return {name: (root / name).stat().st_size for name in names}


def _complete(folder: CheckpointFolder) -> bool:
    try:
        return bool(json.loads(folder.manifest_path.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def _position(folder: CheckpointFolder) -> str:
    try:
        return str(json.loads(folder.manifest_path.read_text()).get("position", "unknown position"))
    except (OSError, ValueError):
        return "unreadable manifest"


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
