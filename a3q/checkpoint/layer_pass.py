"""Checkpoints inside one pipeline pass: after planning and every few layers; restoring a saved pass.

A :class:`PassCheckpoint` saves, after a layer: the layers finished since the last save (once each), the inputs the
next layer will receive on each stream, every stage's state (:meth:`~a3q.pipeline.stage.CalibratingStage.state_dict`),
the model config (per-layer sizes), the RNG states, the windows' digest and the dtype. Restoring puts all of that
back into a model that went through the stages' ``begin`` again, so the resumed pass computes exactly what the
uninterrupted one would have. The run-level side (which folder, which recipe, group checkpoints) is
:mod:`a3q.checkpoint.run`.

In a data-parallel run every rank calls the same methods at the same layers; rank 0 collects the other ranks' batches
of inputs and alone writes, and each rank restores its own batches (:mod:`a3q.checkpoint.ranks`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from a3q import distributed
from a3q.checkpoint.fields import LAYER_LISTS, CheckpointError
from a3q.checkpoint.ranks import agree, gather_batches
from a3q.checkpoint.state import join_tensors, map_tensors, rng_state, set_rng_state, split_tensors
from a3q.checkpoint.tensor_files import disk_full_refused, file_record, read_tensors, write_tensors
from a3q.layer_store.layer_file import layer_bytes, restore_finished_layer, save_finished_layer

if TYPE_CHECKING:
    from a3q.checkpoint.run import RunCheckpoint
    from a3q.graph import ModelGraph
    from a3q.pipeline.stage import CalibratingStage


@dataclass
class Resumed:
    """Where a restored pass continues: the next layer and each stream's inputs to it."""

    next_layer: int
    hidden: dict[str, list[Tensor]]


class PassCheckpoint:
    """Checkpoints inside one pipeline pass (stage group ``group``); see the module docstring."""

    def __init__(self, run: RunCheckpoint, group: int, label: str, saved: dict[str, Any] | None) -> None:
        self.run, self.group, self.label, self.saved = run, group, label, saved
        self.folder = run.folder.root / f"pass-{group:02d}"
        self.layers: dict[str, Any] = dict(saved["layers"]) if saved else {}
        self.since_layers, self.since = 0, time.monotonic()
        self.windows_sha256: str | None = None
        self.window_count, self.batch_size = 0, 1
        self.shares = distributed.WindowShares(0)

    def deferring_stops(self):
        return self.run.stops.deferred()

    def restore(self, graph: ModelGraph, stages: list[CalibratingStage]) -> Resumed | None:
        """Put the saved pass back into ``graph`` (after every stage's ``begin``) and into ``stages``."""
        if self.saved is None:
            return None
        parameter = next(graph.model.parameters())
        for what, saved, now in (("calibration windows", self.saved.get("windows_sha256"), self.windows_sha256),
                                 ("model dtype", self.saved.get("dtype"), str(parameter.dtype))):
            if saved is not None and saved != now:
                raise CheckpointError(f"--resume: the {what} differ from the checkpoint's ({saved} → {now}): the "
                                      "calibration text or the resolved dtype changed; --restart starts over")
        config = graph.model.config
        current = json.loads(config.to_json_string(use_diff=False))
        for key, value in self.saved["config"].items():  # checked when the checkpoint was opened
            if current.get(key) != value and _changes_mid_pass(key):
                setattr(config, key, value)
        root = self.run.folder.root
        for index_text, record in sorted(self.layers.items(), key=lambda item: int(item[0])):
            with _restoring(root / record["file"], f"layer {index_text} of the model"):  # to memory, or its store
                restore_finished_layer(graph, int(index_text), record["modules"], root / record["file"])
        to_model = lambda tensor: tensor.to(parameter.device)  # noqa: E731  (files load onto the CPU)
        with _restoring(root / self.saved["state_file"], "the pass's state"):
            state = join_tensors(self.saved["state"], read_tensors(root / self.saved["state_file"]))
            for stage, stage_state in zip(stages, state["stages"]):
                stage.load_state_dict(map_tensors(stage_state, to_model))
            set_rng_state(state["rng"])
        return Resumed(next_layer=self.saved["next_layer"], hidden=self._my_batches(state["hidden"], to_model))

    def _my_batches(self, hidden: dict[str, list[Tensor]], to_model: Any) -> dict[str, list[Tensor]]:
        """This rank's batches of the saved inputs (all batches, in the one-process order, whatever the number of
        processes that saved them), on the model's device."""
        batches = -(-self.window_count // self.batch_size)
        for name, saved in hidden.items():
            if len(saved) != batches:
                raise CheckpointError(f"--resume: the checkpoint holds the inputs of {len(saved)} batch(es) for "
                                      f"{name}, this pass has {batches} ({self.window_count} windows in batches of "
                                      f"{self.batch_size}); --restart starts over")
        mine = self.shares.batches_of(distributed.rank())
        return map_tensors({name: saved[mine] for name, saved in hidden.items()}, to_model)

    def bind(self, windows: Tensor, batch_size: int = 1) -> None:
        """The pass's calibration windows (all of them, unsharded) and batch size: a resume must see the same
        windows (the text may have changed), and they say which batches of saved inputs belong to which rank."""
        self.windows_sha256 = hashlib.sha256(windows.cpu().to(torch.int64).numpy().tobytes()).hexdigest()
        self.window_count, self.batch_size = windows.shape[0], batch_size
        self.shares = distributed.WindowShares(windows.shape[0], batch_size, distributed.world_size())

    def after_plan(self, graph: ModelGraph, stages: list[CalibratingStage], hidden: dict[str, list[Tensor]]) -> None:
        """After planning stages planned (before layer 0): their plans are costly to repeat."""
        self.run.stops.reached(f"group{self.group}.plan", after_checkpoint=False)
        self.run.stops.requested = agree(False, self.run.stops.requested)[1]
        if self.run.enabled:
            self._save(graph, -1, stages, hidden)
        self.run.stops.reached(f"group{self.group}.plan", after_checkpoint=True)
        self._stop_if_asked(-1)

    def after_layer(self, graph: ModelGraph, index: int, stages: list[CalibratingStage],
                    hidden: dict[str, list[Tensor]]) -> None:
        """After layer ``index`` is finished by every stage: checkpoint when due (or when a stop was asked)."""
        point = f"group{self.group}.layer{index}"
        self.run.stops.reached(point, after_checkpoint=False)
        self.since_layers += 1
        recipe = self.run.recipe
        due = (recipe.checkpoint_every > 0 and self.since_layers >= recipe.checkpoint_every) or (
            recipe.checkpoint_minutes is not None and time.monotonic() - self.since >= 60 * recipe.checkpoint_minutes)
        due, self.run.stops.requested = agree(due, self.run.stops.requested)  # the same on every rank
        if self.run.enabled and (due or self.run.stops.requested):
            self._save(graph, index, stages, hidden)
            self.run.stops.reached(point, after_checkpoint=True)
        self._stop_if_asked(index)

    def _stop_if_asked(self, index: int) -> None:
        where = "after planning" if index < 0 else f"after layer {index}"
        self.run.stops.stop_if_requested(f"{where} of {self.label}", self.run.folder.root if self.run.enabled else None)

    def _save(self, graph: ModelGraph, index: int, stages: list[CalibratingStage],
              hidden: dict[str, list[Tensor]]) -> None:
        started = time.perf_counter()
        hidden = gather_batches(hidden, self.shares)  # rank 0: every rank's batches
        if not self.run.owner:  # ranks ≠ 0 of a distributed run never write
            self.since_layers, self.since = 0, time.monotonic()
            return
        self.run.folder.create()
        self.run.folder.own_folder(self.folder.name)  # refused when a link: nothing is written through one
        for layer in range(len(self.layers), index + 1):  # each written once: an offload store's file is linked
            name = f"{self.folder.name}/layer-{layer:05d}.safetensors"
            path = self.run.folder.root / name
            with disk_full_refused(path, lambda: layer_bytes(graph, layer)):  # noqa: B023  (called at once)
                modules = save_finished_layer(graph, layer, path)
            self._record(name, file_record(path))
            self.layers[str(layer)] = {"file": name, "modules": modules}
        tensors: dict[str, Tensor] = {}
        state = split_tensors({"hidden": hidden, "stages": [stage.state_dict() for stage in stages],
                               "rng": rng_state()}, tensors)
        state_file = f"{self.folder.name}/state-{index + 1:05d}.safetensors"
        self._record(state_file, write_tensors(self.run.folder.root / state_file, tensors))
        previous = self.saved["state_file"] if self.saved else None
        self.saved = {"group": self.group, "next_layer": index + 1, "layers": self.layers, "state_file": state_file,
                      "windows_sha256": self.windows_sha256, "dtype": str(next(graph.model.parameters()).dtype),
                      "state": state, "config": json.loads(graph.model.config.to_json_string(use_diff=False))}
        position = "after planning" if index < 0 else f"after layer {index}"
        self.run.commit(**{"pass": self.saved, "position": f"{position} of {self.label}"})
        if previous and previous != state_file:
            self.run.folder.remove_file(previous)
            self.run.records.pop(previous, None)
        self.since_layers, self.since = 0, time.monotonic()
        self.run.seconds += time.perf_counter() - started

    def _record(self, name: str, record: dict[str, Any]) -> None:
        self.run.records[name] = record
        self.run.bytes_written += record["bytes"]


def _changes_mid_pass(key: str) -> bool:
    """Whether a stage may have changed config ``key`` inside a pass: the per-layer sizes
    (:data:`~a3q.checkpoint.consistency.LAYER_LISTS`) and a3q's own records (``a3q_factorized``). Nothing else is
    taken from a checkpoint's config."""
    return key in LAYER_LISTS or key.startswith("a3q_")


@contextmanager
def _restoring(path: Path, what: str) -> Iterator[None]:
    """A file that passed every check but still cannot be put back (a resealed, crafted one) is refused by name."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001  (tensor names, shapes, module arguments, state attributes)
        raise CheckpointError(f"checkpoint file '{path}' cannot be restored as {what} ({exc}); --restart starts "
                              "over") from None
