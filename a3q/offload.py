"""Offloaded models: decoder layers stay on disk (or in host memory) and are materialized one at a time.

Why: a 70B model in bfloat16 is 140 GB; a3q's layer-by-layer pipeline only ever needs one decoder layer at a time.
With ``offload: disk | cpu`` the model is built on the meta device (no memory), the embeddings, final norm and LM
head are loaded on the run's device, and each decoder layer is read from the checkpoint's safetensors
(memory-mapped, through ``safetensors.safe_open``) when the pipeline reaches it. A layer a stage changed is written to
the offload store when the pipeline lets go of it: a folder of per-layer safetensors files (``disk``) or host-memory
tensors (``cpu``, for a GPU run whose model fits in RAM but not on the device). Then its parameters go back to the
meta device, so peak memory is the non-layer weights plus one layer plus the captured activations.

Everything goes through :meth:`OffloadedLayers.hold`: the pipeline holds the layer it works on, probes and evaluation
hold each layer in turn. Holds nest (a probe holds the changed layer while it runs the later ones). Export writes the
artifact shard by shard from the held layers (:mod:`a3q.io.streaming`).

The layer format is the checkpoint's (:mod:`a3q.checkpoint.layers`): tensors plus the constructor arguments of
swapped-in modules (GPTQ, low-rank), never pickle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from a3q.arch import LAYER_PREFIX, decoder_layers
from a3q.checkpoint.layers import restore_layer, save_layer
from a3q.numerics import check_module_finite

OFFLOAD_MODES = ("none", "cpu", "disk", "auto")


class OffloadedLayers:
    """Where each decoder layer of an offloaded model lives, and the one way to get it into memory (:meth:`hold`).

    ``source``: tensor name → safetensors file of the checkpoint the model was loaded from (unchanged layers are
    read from there); ``convert_layer``: maps a layer's tensors from the checkpoint's names and layout to the model
    class's (identity except for GPT-2's fused ``c_attn``); ``store``: a folder for changed layers (``disk``) or
    None (``cpu``: they stay in host memory).
    """

    def __init__(self, model: nn.Module, family: str, device: torch.device, source: dict[str, Path],
                 convert_layer: Any = None, store: Path | None = None) -> None:
        self.model, self.family, self.device = model, family, torch.device(device)
        self.source, self.convert_layer = source, convert_layer
        self.mode = "disk" if store is not None else "cpu"
        self.store = store
        if store is not None:  # the folder goes with the model (or at exit); a killed process leaves it behind
            weakref.finalize(self, _remove_store, store)
        self._changed: dict[int, Any] = {}  # index → (modules, tensors) in host memory, or a file in the store
        self._holds: dict[int, int] = {}
        self._dirty: set[int] = set()
        self.loads = 0
        self.bytes_read = 0

    # -- holding a layer ---------------------------------------------------------------------------------------
    @contextmanager
    def hold(self, index: int) -> Iterator[nn.Module]:
        """Layer ``index`` materialized on the device for the duration; released (saved first when changed) after
        the outermost hold of it ends."""
        if not self._holds.get(index):
            self._materialize(index)
        self._holds[index] = self._holds.get(index, 0) + 1
        try:
            yield decoder_layers(self.model, self.family)[index]
        finally:
            self._holds[index] -= 1
            if not self._holds[index]:
                del self._holds[index]
                self._release(index)

    def mark_changed(self, index: int) -> None:
        """A stage changed held layer ``index``: it is written to the store when released."""
        self._dirty.add(index)

    def restore(self, index: int, modules: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Take a finished layer saved elsewhere (a pass checkpoint) as layer ``index``'s current weights."""
        restore_layer(self.model, self.family, index, modules, tensors, device=self.device)
        self._dirty.add(index)
        self._release(index)

    def changed_layers(self) -> list[int]:
        return sorted(set(self._changed) | self._dirty)

    def _materialize(self, index: int) -> None:
        self.loads += 1
        record = self._changed.get(index)
        if record is None:
            tensors = self._read_source(index)
            layer = decoder_layers(self.model, self.family)[index]
            targets = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
            state = {name: tensor.to(device=self.device, dtype=targets[name].dtype if name in targets else None)
                     for name, tensor in tensors.items()}
            missing = layer.load_state_dict(state, strict=False, assign=True).missing_keys
            if missing:
                raise RuntimeError(f"layer {index}: tensors missing from the checkpoint: {sorted(missing)}")
            # the load-time check of an offloaded model sees no layer weights: check each as it is first read
            check_module_finite(layer, "load", prefix=LAYER_PREFIX[self.family].format(index=index))
            return
        modules, tensors = self._read_store(record)
        restore_layer(self.model, self.family, index, modules, tensors, device=self.device)

    def _release(self, index: int) -> None:
        if index in self._dirty:
            self._dirty.discard(index)
            modules, tensors = save_layer(self.model, self.family, index)
            self._changed[index] = self._write_store(index, modules, tensors)
        to_meta(decoder_layers(self.model, self.family)[index])

    # -- reading and writing layers ----------------------------------------------------------------------------
    def _read_source(self, index: int) -> dict[str, Tensor]:
        prefix = LAYER_PREFIX[self.family].format(index=index)
        names = [name for name in self.source if name.startswith(prefix)]
        tensors = read_tensors(self.source, names)
        self.bytes_read += sum(t.numel() * t.element_size() for t in tensors.values())
        if self.convert_layer is not None:
            tensors = self.convert_layer(tensors)
        return {name[len(prefix):]: tensor for name, tensor in tensors.items()}

    def _write_store(self, index: int, modules: dict[str, Any], tensors: dict[str, Tensor]) -> Any:
        if self.store is None:
            return modules, {name: tensor.to("cpu", copy=True) for name, tensor in tensors.items()}
        path = self.store / f"layer-{index:05d}.safetensors"
        save_file({name: tensor.contiguous().cpu() for name, tensor in tensors.items()}, str(path),
                  metadata={"modules": json.dumps(modules)})
        return path

    def _read_store(self, record: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
        if not isinstance(record, Path):
            return record
        with safe_open(str(record), framework="pt") as handle:
            modules = json.loads((handle.metadata() or {}).get("modules", "{}"))
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        self.bytes_read += sum(t.numel() * t.element_size() for t in tensors.values())
        return modules, tensors

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, "layer_loads": self.loads, "bytes_read": self.bytes_read,
                "store": str(self.store) if self.store is not None else None}


STORE_PREFIX = ".a3q-offload-"
#: written inside every store when it is created: who made it (pid, its start time, host)
STORE_MARKER = ".a3q-offload-store"
_STORE_FILE = re.compile(r"layer-\d{5}\.safetensors")


def _remove_store(store: Path) -> None:
    """Delete this process's offload store (only folders a3q made, named with :data:`STORE_PREFIX`)."""
    if store.name.startswith(STORE_PREFIX) and not store.is_symlink():
        shutil.rmtree(store, ignore_errors=True)


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux), or None when unknown."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _creator() -> dict[str, Any]:
    return {"pid": os.getpid(), "start": _process_start(os.getpid()), "host": socket.gethostname()}


def _still_running(creator: dict[str, Any]) -> bool:
    """Whether the process that made a store still runs on this machine (its pid AND start time: pids are reused).
    A store made on another machine is stale: the run that holds the output folder's lock is the only one using it."""
    pid = creator.get("pid")
    if creator.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    start = _process_start(pid)
    if start is not None or Path("/proc/self/stat").exists():
        return start is not None and start == creator.get("start")
    try:  # no /proc: the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_offload_stores(folder: Path) -> list[Path]:
    """Delete the offload stores a killed run left in ``folder`` (``kill -9`` skips every cleanup); returns them.

    A store is removed only when it is a3q's and stale: a real folder (not a symbolic link) named
    ``.a3q-offload-*``, holding a3q's marker (:data:`STORE_MARKER`, a regular file) and nothing but a3q's layer files,
    whose creating process no longer runs. Anything else, a look-alike without the marker included, is left alone.
    Call it while holding the output folder's run lock (:mod:`a3q.io.run_lock`): no other run then uses a store there.
    """
    removed: list[Path] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda item: item.name)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if not entry.name.startswith(STORE_PREFIX) or entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
            continue
        store = Path(entry.path)
        marker = store / STORE_MARKER
        try:
            if not stat.S_ISREG(os.lstat(marker).st_mode) or os.lstat(marker).st_size > 4096:
                continue
            creator = json.loads(marker.read_text())
            contents = list(os.scandir(store))
        except (OSError, ValueError):
            continue
        if not isinstance(creator, dict) or _still_running(creator):
            continue
        if not all(item.is_file(follow_symlinks=False)
                   and (item.name == STORE_MARKER or _STORE_FILE.fullmatch(item.name)) for item in contents):
            continue  # holds something a3q does not write there: not a3q's to delete
        for item in contents:
            if item.name != STORE_MARKER:
                os.unlink(item.path)
        marker.unlink()  # last: a removal cut short is finished next time
        store.rmdir()
        removed.append(store)
    return removed


@contextmanager
def hold_layer(graph: Any, index: int) -> Iterator[nn.Module]:
    """Decoder layer ``index`` of ``graph``'s model, materialized for the duration when the model is offloaded."""
    if graph.offload is None:
        yield decoder_layers(graph.model, graph.family)[index]
        return
    graph.offload.model = graph.model  # a stage may have replaced the model object (same layers, same files)
    with graph.offload.hold(index) as layer:
        yield layer


def new_store(near: Path | str | None) -> Path:
    """A fresh, private folder for offloaded layers, beside the run's output when there is one (same disk), marked
    as a3q's (:data:`STORE_MARKER`) so that the next run in that folder removes it if this process is killed."""
    if near is not None:
        near = Path(near)
        near.mkdir(parents=True, exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix=STORE_PREFIX, dir=near))
    (store / STORE_MARKER).write_text(json.dumps(_creator()))
    return store


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


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file holding it, for a model folder (one file or shards + index)."""
    from a3q.io.shards import weight_files

    source: dict[str, Path] = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                source[name] = path
    return source
