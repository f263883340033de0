"""Load a model reference (alias, HF folder, or a3q artifact) into a ModelGraph, offline.

An a3q artifact is checked against its manifest first (every file's size and SHA-256, and the manifest's own seal;
see :mod:`a3q.io.manifest`); ``verify=False`` skips that for speed. Weights are read from safetensors only: a3q
never unpickles a file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import a3q.arch.auto  # noqa: F401  (registers a3q's model classes with the Auto classes)
from a3q.arch import describe, layer_linears
from a3q.assets.models import resolve_model_path
from a3q.cache import get_settings
from a3q.graph import LayerStore
from a3q.io.adapter import attach_adapter
from a3q.io.json_file import JSONFileError, read_json_file
from a3q.io.manifest import MANIFEST_NAME, ArtifactError, read_manifest, verify_artifact
from a3q.io.model_folder import MAX_CONFIG_BYTES, ModelFolderError, model_folder_problem
from a3q.io.shards import WEIGHTS_INDEX, ShardIndexError, weight_files
from a3q.layer_store.loading import OFFLOADED, load_on_meta
from a3q.arch.auto import A3_MODEL_TYPES
from a3q.module_types import adopt_loaded_model, rebuilt_by_a3q, storage_of
from a3q.placement import resolve_device, resolve_dtype

__all__ = ["MANIFEST_NAME", "ArtifactError", "load_graph", "read_manifest"]


def _written_by_a3q(config: dict) -> bool:
    """Whether a config.json says a3q wrote the folder (so it must have a manifest)."""
    auto_map = config.get("auto_map") or {}
    names = auto_map.values() if isinstance(auto_map, dict) else []
    return (
        config.get("model_type") in A3_MODEL_TYPES
        or rebuilt_by_a3q(config)
        or any(isinstance(name, str) and "a3q" in name for name in names)
    )


def load_graph(reference: str | Path, dtype: str = "float32", verify: bool = True, device: str | torch.device = "cpu",
               revision: str | None = None, offload: str = "none", offload_near: Path | None = None):
    """Load ``reference`` into a :class:`~a3q.graph.ModelGraph` on ``device``.

    ``reference`` is an alias, a local folder, or a Hub id ``org/name`` (at ``revision``) already in the Hub cache, or
    downloaded when the environment is online (:func:`a3q.assets.models.resolve_model_path`). ``dtype`` and
    ``device`` may be ``auto`` (:mod:`a3q.placement`: the checkpoint's dtype on a GPU, float32 on a CPU).
    a3q's own model classes are registered with transformers first, so artifacts written by
    a3q load in-process without ``trust_remote_code``. With ``verify`` (the default) an artifact whose files do not
    match its manifest, or an a3q-written folder without one, is refused with the file named.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_model_path(str(reference), revision)
    manifest = read_manifest(path)
    if verify and manifest is not None:
        verify_artifact(path, manifest)
    problem = model_folder_problem(Path(path)) if verify else None  # the file at fault named, before transformers
    if problem:                                                      # reads anything (verify=False trusts the folder)
        raise ModelFolderError(problem)
    config = _config_dict(path)
    where = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, config, where)
    if verify and manifest is None and _written_by_a3q(config):
        raise ArtifactError(f"{Path(path) / MANIFEST_NAME}: missing, but config.json says a3q wrote this folder "
                            "(pass verify=False to load it unchecked)")
    if offload in OFFLOADED or rebuilt_by_a3q(config):  # a3q builds the model: its module types, layers offloaded
        model, store = load_on_meta(path, _weight_files(path), config, torch_dtype, where, offload, offload_near)
    else:  # on a GPU transformers places the weights itself (bitsandbytes' int8 weights must not be moved by .to)
        placement = {"device_map": str(where)} if where.type != "cpu" else {}
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, use_safetensors=True, **placement)
        store = LayerStore()
    model.eval()
    adopt_loaded_model(model)  # e.g. bitsandbytes linears: a3q's exact CPU path (see a3q.quant.bnb)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    history = manifest.get("structure", {}).get("history", []) if manifest else []
    graph = describe(model, tokenizer, source=str(reference), history=history)
    graph.layer_store = store
    _describe_storage(graph)
    # the quantized-cache setting is also in generation_config.json; the (sealed) manifest is the record that counts
    structure = manifest.get("structure", {}) if manifest else {}
    settings = structure.get("kv_cache") if manifest else get_settings(model)
    if settings is not None or get_settings(model) is not None:
        graph.set_kv_cache(settings)
    if (Path(path) / "adapter" / "adapter_config.json").is_file():  # an unmerged LoRA adapter, in PEFT's format
        graph = attach_adapter(graph, Path(path) / "adapter")
    return graph


def load_tokenizer(reference: str | Path, revision: str | None = None):
    """The tokenizer of a model reference alone (the folder checked first, as :func:`load_graph` does): for work that
    must happen before the model loads, such as reading and checking text."""
    path = resolve_model_path(str(reference), revision)
    problem = model_folder_problem(Path(path))
    if problem:
        raise ModelFolderError(problem)
    return AutoTokenizer.from_pretrained(str(path))


def _config_dict(path: Path) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return {}
    try:
        config = read_json_file(config_file, MAX_CONFIG_BYTES)
    except JSONFileError as exc:
        raise ArtifactError(f"{config_file} {exc.reason}") from None
    return config if isinstance(config, dict) else {}


def _describe_storage(graph) -> None:
    """Record how each decoder linear is stored (GPTQ, bitsandbytes, …) in the graph's layer structures."""
    for index, layer in enumerate(graph.layers):
        for short, module in layer_linears(graph.model, graph.family, index).items():
            storage = storage_of(module)
            if storage is not None:
                layer.quantized[short] = storage


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a folder's weights, each present (a missing shard is named)."""
    try:
        files = weight_files(path)
    except ShardIndexError as exc:
        raise ArtifactError(f"{Path(path) / WEIGHTS_INDEX}: {exc}") from None
    if not files:
        raise ArtifactError(f"{path}: no *.safetensors weights")
    for weights in files:
        if not weights.is_file():
            raise ArtifactError(f"{weights}: weights shard named in {WEIGHTS_INDEX} is missing")
    return files
