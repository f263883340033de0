"""Offloaded layers: decoder layers stay on disk (or in host memory) and are materialized one at a time.

Why: a 70B model in bfloat16 is 140 GB; a3q's layer-by-layer pipeline only ever needs one decoder layer at a time.
With ``offload: disk | cpu`` the model is built on the meta device (no memory), the embeddings, final norm and LM
head are loaded on the run's device (:mod:`a3q.layer_store.loading`), and each decoder layer is read from the
checkpoint's safetensors (memory-mapped, through ``safetensors.safe_open``) when something holds it. A layer a stage
changed is written to the store when the last hold of it ends: a private folder of layer files (``disk``,
:mod:`a3q.layer_store.layer_file`; :mod:`a3q.layer_store.folders`) or host-memory tensors (``cpu``, for a GPU run
whose model fits in RAM but not on the device). Then its parameters go back to the meta device, so peak memory is
the non-layer weights plus one layer plus the captured activations.

Holds nest (a probe holds the changed layer while it runs the later ones). Export writes the artifact shard by shard
from held layers (:mod:`a3q.layer_store.streaming`); perplexity is scored layer by layer (``layer_by_layer``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from a3q.arch import LAYER_PREFIX, decoder_layers
from a3q.graph import LayerStore, ModelGraph
from a3q.layer_store.folders import layer_file_name, remove_store_folder
from a3q.layer_store.layer_file import link_or_copy, read_layer_file, restore_layer, save_layer, write_layer_file
from a3q.layer_store.streaming import write_offloaded_weights
from a3q.numerics import check_module_finite

#: a layer the store keeps: the path of its layer file (``disk``) or its swapped modules and tensors (``cpu``)
Stored = Path | tuple[dict[str, Any], dict[str, Tensor]]


class OffloadedLayers(LayerStore):
    """Where each decoder layer of an offloaded model lives, and how it gets into memory (see the module docstring).

    ``source``: tensor name → safetensors file of the checkpoint the model was loaded from (unchanged layers are
    read from there); ``convert_layer``: maps a layer's tensors from the checkpoint's names and layout to the model
    class's (identity except for GPT-2's fused ``c_attn``); ``folder``: the store's folder for changed layers
    (``disk``) or None (``cpu``: they stay in host memory).
    """

    layer_by_layer = True

    def __init__(self, family: str, device: torch.device | str, source: dict[str, Path],
                 convert_layer: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
                 folder: Path | None = None) -> None:
        super().__init__()
        self.family, self.device = family, torch.device(device)
        self.source, self.convert_layer = source, convert_layer
        self.mode = "disk" if folder is not None else "cpu"
        self.folder = folder
        if folder is not None:  # the folder goes with the model (or at exit); a killed process leaves it behind
            weakref.finalize(self, remove_store_folder, folder)
        self._stored: dict[int, Stored] = {}
        self._holds: dict[int, int] = {}
        self._dirty: set[int] = set()
        self.loads = 0
        self.bytes_read = 0

    # -- holding a layer ---------------------------------------------------------------------------------------
    @contextmanager
    def materialized(self, graph: ModelGraph, index: int) -> Iterator[None]:
        """Layer ``index`` on the device for the duration; released (stored first when changed) after the
        outermost hold of it ends."""
        if not self._holds.get(index):
            self._materialize(graph, index)
        self._holds[index] = self._holds.get(index, 0) + 1
        try:
            yield
        finally:
            self._holds[index] -= 1
            if not self._holds[index]:
                del self._holds[index]
                self._release(graph, index)

    def mark_changed(self, graph: ModelGraph, index: int, saved: Path | None = None) -> None:
        """Layer ``index`` changed: stored when released (at once when nobody holds it). ``saved``: a layer file
        that already holds it (a checkpoint's), which a ``disk`` store links instead of writing the layer again."""
        super().mark_changed(graph, index)
        if saved is not None and self.folder is not None:
            target = self.folder / layer_file_name(index)
            link_or_copy(saved, target)
            self._stored[index] = target
            self._dirty.discard(index)
        else:
            self._dirty.add(index)
        if not self._holds.get(index):
            self._release(graph, index)

    def stored_layer(self, graph: ModelGraph, index: int) -> Stored | None:
        """Layer ``index`` as stored; a held, changed layer of a ``disk`` store is written now (once: releasing it
        then writes nothing), while a ``cpu`` store leaves it to the model until released."""
        if index in self._dirty:
            if self.folder is None:
                return None
            self._store(graph, index)
        return self._stored.get(index)

    def write_weights(self, graph: ModelGraph, folder: Path, max_shard_size: int) -> None:
        write_offloaded_weights(graph, folder, max_shard_size)

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "layer_loads": self.loads, "bytes_read": self.bytes_read,
                "store": str(self.folder) if self.folder is not None else None}

    def _materialize(self, graph: ModelGraph, index: int) -> None:
        self.loads += 1
        stored = self._stored.get(index)
        if stored is None:
            tensors = self._read_source(index)
            layer = decoder_layers(graph.model, self.family)[index]
            targets = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
            state = {name: tensor.to(device=self.device, dtype=targets[name].dtype if name in targets else None)
                     for name, tensor in tensors.items()}
            missing = layer.load_state_dict(state, strict=False, assign=True).missing_keys
            if missing:
                raise RuntimeError(f"layer {index}: tensors missing from the checkpoint: {sorted(missing)}")
            # the load-time check of an offloaded model sees no layer weights: check each as it is first read
            check_module_finite(layer, "load", prefix=LAYER_PREFIX[self.family].format(index=index))
            return
        modules, tensors = read_layer_file(stored) if isinstance(stored, Path) else stored
        if isinstance(stored, Path):
            self.bytes_read += sum(t.numel() * t.element_size() for t in tensors.values())
        restore_layer(graph.model, self.family, index, modules, tensors, device=self.device)

    def _release(self, graph: ModelGraph, index: int) -> None:
        if index in self._dirty:
            self._store(graph, index)
        to_meta(decoder_layers(graph.model, self.family)[index])

    def _store(self, graph: ModelGraph, index: int) -> None:
        modules, tensors = save_layer(graph.model, self.family, index)
        if self.folder is None:
            self._stored[index] = modules, {name: tensor.to("cpu", copy=True) for name, tensor in tensors.items()}
        else:
            path = self.folder / layer_file_name(index)
            write_layer_file(path, modules, tensors)
            self._stored[index] = path
        self._dirty.discard(index)

    def _read_source(self, index: int) -> dict[str, Tensor]:
        prefix = LAYER_PREFIX[self.family].format(index=index)
        tensors = read_tensors(self.source, [name for name in self.source if name.startswith(prefix)])
        self.bytes_read += sum(t.numel() * t.element_size() for t in tensors.values())
        if self.convert_layer is not None:
            tensors = self.convert_layer(tensors)
        return {name[len(prefix):]: tensor for name, tensor in tensors.items()}


def to_meta(module: nn.Module) -> None:
    """Free ``module``'s parameters and persistent buffers (they go to the meta device; shapes and dtypes stay).

    Non-persistent buffers (RoPE tables derived from the config) are small and not in any file: they stay.
    """
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and not param.is_meta:
                sub._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and not buffer.is_meta and name not in sub._non_persistent_buffers_set:
                sub._buffers[name] = torch.empty_like(buffer, device="meta")


def read_tensors(source: dict[str, Path], names: list[str]) -> dict[str, Tensor]:
    """``names`` read from their safetensors files (memory-mapped; one open per file)."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(source[name], []).append(name)
    tensors: dict[str, Tensor] = {}
    for path, wanted in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for name in wanted:
                tensors[name] = handle.get_tensor(name)
    return tensors
