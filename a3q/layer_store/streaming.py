"""An offloaded model's weights written as safetensors shards, one decoder layer in memory at a time.

``save_pretrained`` needs every tensor in memory; an offloaded model has one layer there at most. So the shards are
planned from the tensors' shapes (the meta device knows them), each shard is filled by holding its layers in turn
and written with ``safetensors.torch.save_file``, and transformers' index (``model.safetensors.index.json``) names
the file of every tensor. Shards are cut at layer boundaries (a layer bigger than the limit gets a shard of its own),
so a layer is read once. The names, layout and config are what ``save_pretrained`` writes, so the folder loads with
``from_pretrained`` like any other artifact (the export around it adds the remote code: :mod:`a3q.io.artifact`).

Memory: one shard's tensors plus the layer being read. A shard is therefore capped at :data:`OFFLOADED_SHARD_LIMIT`
whatever ``max_shard_size`` says.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from a3q.arch import LAYER_PREFIX
from a3q.graph import ModelGraph
from a3q.layer_store.hold import hold_layer

#: the most bytes of tensors one shard holds when the model is offloaded (its tensors are in memory while written)
OFFLOADED_SHARD_LIMIT = 1 << 30


def _plan(graph: ModelGraph, limit: int) -> list[list[tuple[int | None, list[str]]]]:
    """Shards as lists of ``(layer index or None, tensor names)``, in state-dict order, tied tensors once."""
    state = graph.model.state_dict(keep_vars=True)
    prefixes = [LAYER_PREFIX[graph.family].format(index=i) for i in range(len(graph.layers))]
    seen: set[int] = set()
    units: list[tuple[int | None, list[str], int]] = []
    for name, tensor in state.items():
        if id(tensor) in seen:  # a tied weight (the LM head under tied embeddings) is stored once, as transformers does
            continue
        seen.add(id(tensor))
        layer = next((i for i, prefix in enumerate(prefixes) if name.startswith(prefix)), None)
        size = tensor.numel() * tensor.element_size()
        if units and units[-1][0] == layer:
            units[-1] = (layer, units[-1][1] + [name], units[-1][2] + size)
        else:
            units.append((layer, [name], size))
    shards: list[list[tuple[int | None, list[str]]]] = [[]]
    filled = 0
    for layer, names, size in units:
        if shards[-1] and filled + size > limit:
            shards.append([])
            filled = 0
        shards[-1].append((layer, names))
        filled += size
    return shards


def write_offloaded_weights(graph: ModelGraph, folder: Path, max_shard_size: int) -> list[str]:
    """Write ``graph``'s offloaded model into ``folder`` (config, generation config, weights); returns the files."""
    model = graph.model
    shards = _plan(graph, min(max_shard_size, OFFLOADED_SHARD_LIMIT))
    model.config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    names = [SAFE_WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map: dict[str, str] = {}
    total = 0
    for file_name, shard in zip(names, shards):
        tensors: dict[str, Tensor] = {}
        for layer, keys in shard:
            tensors.update(_read(graph, layer, keys))
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file_name))
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _read(graph: ModelGraph, layer: int | None, keys: list[str]) -> dict[str, Tensor]:
    """The tensors ``keys`` (full names) on the CPU, holding decoder layer ``layer`` while they are taken."""
    if layer is None:
        state = graph.model.state_dict()
        return {key: state[key].detach().cpu().contiguous() for key in keys}
    prefix = LAYER_PREFIX[graph.family].format(index=layer)
    with hold_layer(graph, layer) as module:
        state = module.state_dict()
        return {key: state[key[len(prefix):]].detach().cpu().contiguous() for key in keys}
