"""The layer file: one finished decoder layer as tensors plus what rebuilding its modules needs, never pickle.

Stages change a layer in two ways only (:mod:`a3q.arch.surgery`): they rebuild it at new sizes, which the model
config's per-layer lists record (``qk_head_dims``, ``intermediate_sizes``, ``a3q_factorized``…), or they swap a linear
for a module of a registered type (:mod:`a3q.module_types`). A layer is therefore saved as its state dict plus the
swapped modules with their constructor arguments, and restored by building the layer from the config, swapping in
empty modules of the recorded types and assigning the saved tensors (dtypes included).

On disk a layer file is a safetensors file whose metadata ``modules`` holds the swapped modules as JSON. The offload
store and pass checkpoints write the same files, each once: a checkpoint links the store's file when the store has
one (:func:`save_finished_layer`), and an offloaded resume links the checkpoint's file into the store.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor, nn

from a3q.arch import decoder_layers
from a3q.arch.auto import is_a3_model
from a3q.arch.convert import fill_meta_buffers
from a3q.module_types import build_module, swapped_modules

if TYPE_CHECKING:
    from a3q.graph import ModelGraph

#: the safetensors metadata key that holds a layer file's swapped modules
MODULES_KEY = "modules"


def build_layer(model: nn.Module, family: str, index: int) -> nn.Module:
    """Layer ``index`` as ``model.config`` describes it now, on the meta device (no memory, no random init).

    Models of transformers' own classes have no per-layer sizes: their layer's structure is the loaded one, so the
    existing module is returned.
    """
    old = decoder_layers(model, family)[index]
    if not is_a3_model(model):
        return old
    with torch.device("meta"):
        return type(old)(model.config, index)


def save_layer(model: nn.Module, family: str, index: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Layer ``index``'s swapped modules (JSON) and its tensors."""
    layer = decoder_layers(model, family)[index]
    return swapped_modules(layer), {name: tensor.detach().contiguous() for name, tensor in layer.state_dict().items()}


def restore_layer(model: nn.Module, family: str, index: int, swapped: dict[str, dict[str, Any]],
                  tensors: dict[str, Tensor], device: torch.device | str | None = None) -> None:
    """Put back layer ``index`` from :func:`save_layer`'s output (the config must already be restored), on
    ``device`` (default: where the old layer's weights are, or the embeddings' device when the layer is offloaded
    and its weights are on the meta device). The saved tensors keep their dtypes."""
    layers = decoder_layers(model, family)
    old = layers[index]
    reference = next(old.parameters())
    if device is None:
        device = reference.device if not reference.is_meta else model.get_input_embeddings().weight.device
    device = torch.device(device)
    new = build_layer(model, family, index)
    for path, spec in swapped.items():
        new.set_submodule(path, build_module(spec, dtype=reference.dtype, device="meta"))
    new.load_state_dict({name: tensor.to(device) for name, tensor in tensors.items()}, strict=True, assign=True)
    fill_meta_buffers(new, device, old)  # RoPE index tables: derived from the config, in no file
    new.train(old.training)
    layers[index] = new


def save_tensors_atomically(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """``tensors`` as safetensors at ``path``, through a temporary sibling renamed into place: a file another name
    links to (a checkpoint's, a store's) is replaced, never written through, and a failed write leaves no file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)  # a leftover (or a link put there) is replaced, never written through
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)  # looked up now: tests replace it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_layer_file(path: Path, modules: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    save_tensors_atomically(path, {name: tensor.contiguous().cpu() for name, tensor in tensors.items()},
                            metadata={MODULES_KEY: json.dumps(modules)})


def read_layer_file(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A layer file's swapped modules and tensors (on the CPU)."""
    with safe_open(str(path), framework="pt") as handle:
        modules = json.loads((handle.metadata() or {}).get(MODULES_KEY, "{}"))
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    return modules, tensors


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a second name of ``source`` (a hard link: nothing written), or a copy where links are not
    possible (another file system); through a temporary sibling, so ``target`` is replaced whole."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_finished_layer(graph: ModelGraph, index: int, path: Path) -> dict[str, Any]:
    """Layer ``index`` of ``graph`` as a layer file at ``path`` (a pass checkpoint's), written once: the store's own
    file when it has one, else the layer as the store or the model holds it. Returns its swapped modules."""
    stored = graph.layer_store.stored_layer(graph, index)
    if isinstance(stored, Path):
        link_or_copy(stored, path)
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get(MODULES_KEY, "{}"))
    modules, tensors = stored if stored is not None else save_layer(graph.model, graph.family, index)
    write_layer_file(path, modules, tensors)
    return modules


def layer_bytes(graph: ModelGraph, index: int) -> int:
    """Bytes of layer ``index``'s tensors (known from their shapes, also while the layer is offloaded)."""
    tensors = decoder_layers(graph.model, graph.family)[index].state_dict().values()
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def restore_finished_layer(graph: ModelGraph, index: int, modules: dict[str, Any], path: Path) -> None:
    """Put back layer ``index`` from the layer file at ``path`` with the (checked) swapped ``modules``; an offloaded
    layer goes back to its store, which keeps the file rather than writing the layer again."""
    _, tensors = read_layer_file(path)
    restore_layer(graph.model, graph.family, index, modules, tensors)
    graph.layer_store.mark_changed(graph, index, saved=path)
