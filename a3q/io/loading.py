"""Load a model reference (alias, HF folder, or a3q artifact) into a ModelGraph, offline.

An a3q artifact is checked against its manifest first (every file's size and SHA-256, and the manifest's own seal;
see :mod:`a3q.io.manifest`); ``verify=False`` skips that for speed. Weights are read from safetensors only: a3q
never unpickles a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from a3q.arch import describe
from a3q.assets.models import resolve_model_path
from a3q.io.manifest import MANIFEST_NAME, ArtifactError, read_manifest, verify_artifact
from a3q.io.model_folder import ModelFolderError, model_folder_problem

__all__ = ["DTYPES", "MANIFEST_NAME", "ArtifactError", "load_graph", "read_manifest"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _written_by_a3q(config: dict) -> bool:
    """Whether a config.json says a3q wrote the folder (so it must have a manifest)."""
    from a3q.modeling.auto import A3_MODEL_TYPES

    auto_map = config.get("auto_map") or {}
    names = auto_map.values() if isinstance(auto_map, dict) else []
    return (
        config.get("model_type") in A3_MODEL_TYPES
        or bool(config.get("a3q_gptq") or config.get("a3q_factorized"))
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import a3q.modeling.auto  # noqa: F401  (registers a3q model classes with the Auto classes)

    from a3q.placement import resolve_device, resolve_dtype

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
    offloaded = None
    if offload in ("cpu", "disk"):
        model, offloaded = _load_offloaded(path, config, torch_dtype, where, offload, offload_near)
    elif config.get("a3q_factorized") or config.get("a3q_gptq"):
        model = _load_rebuilt(path, config, torch_dtype)
        if where.type != "cpu":
            model.to(where)
    else:  # on a GPU transformers places the weights itself (bitsandbytes' int8 weights must not be moved by .to)
        placement = {"device_map": str(where)} if where.type != "cpu" else {}
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, use_safetensors=True, **placement)
    model.eval()
    from a3q.quant.bnb import adopt_loaded_model  # bitsandbytes linears: a3q's CPU path (see a3q.quant.bnb)

    adopt_loaded_model(model)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    history = manifest.get("structure", {}).get("history", []) if manifest else []
    graph = describe(model, tokenizer, source=str(reference), history=history)
    graph.offload = offloaded
    _describe_storage(graph)
    # the quantized-cache setting is also in generation_config.json; the (sealed) manifest is the record that counts
    structure = manifest.get("structure", {}) if manifest else {}
    from a3q.cache import get_settings

    settings = structure.get("kv_cache") if manifest else get_settings(model)
    if settings is not None or get_settings(model) is not None:
        graph.set_kv_cache(settings)
    if (Path(path) / "adapter" / "adapter_config.json").is_file():  # an unmerged LoRA adapter, in PEFT's format
        from a3q.io.adapter import attach_adapter

        graph = attach_adapter(graph, Path(path) / "adapter")
    return graph


def load_tokenizer(reference: str | Path, revision: str | None = None):
    """The tokenizer of a model reference alone (the folder checked first, as :func:`load_graph` does): for work that
    must happen before the model loads, such as reading and checking text."""
    from transformers import AutoTokenizer

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
        config = json.loads(config_file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{config_file}: not valid JSON ({exc})") from None
    return config if isinstance(config, dict) else {}


def _describe_storage(graph) -> None:
    """Record how each decoder linear is stored (GPTQ, bitsandbytes, …) in the graph's layer structures."""
    from a3q.arch import layer_linears
    from a3q.quant import storage_of

    for index, layer in enumerate(graph.layers):
        for short, module in layer_linears(graph.model, graph.family, index).items():
            storage = storage_of(module)
            if storage is not None:
                layer.quantized[short] = storage


def _load_rebuilt(path: Path, config_dict: dict, dtype: torch.dtype):
    """Build the model from its config, swap in a3q's module types, then load the weights strictly.

    For two-factor linears of the low-rank baselines (``config.a3q_factorized``) and GPTQ-quantized linears
    (``config.a3q_gptq``). Why not ``from_pretrained``: it builds dense linears and would drop the factor weights as
    unexpected keys, and for a GPTQ checkpoint of a transformers class it would demand gptqmodel (the standard
    ``quantization_config`` is there for plain transformers; a3q does not need it). Only the keys of tied weights
    (the LM head under tied embeddings) may be absent from the files.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from a3q.io.shards import WEIGHTS_INDEX, ShardIndexError, weight_files
    from a3q.quant.gptq_linear import replace_with_gptq_linears
    from a3q.modeling.a3q_factored_linear import replace_with_factored_linears

    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # parameters on the meta device (no memory, no random init): the files' tensors replace them below; buffers
    # (RoPE tables, GPTQ's packed codes) are real, and small
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if config_dict.get("a3q_factorized"):
            replace_with_factored_linears(model, config_dict["a3q_factorized"])
        if config_dict.get("a3q_gptq"):
            replace_with_gptq_linears(model, config_dict["a3q_gptq"])
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    # one file at a time (model.safetensors, or each shard its index names), so a sharded artifact never needs a
    # second full copy of the weights in memory; each tensor takes the model's dtype for it (fp16 GPTQ scales stay
    # fp16 buffers) and is assigned in place of the meta one
    try:
        files = weight_files(path)
    except ShardIndexError as exc:
        raise ArtifactError(f"{Path(path) / WEIGHTS_INDEX}: {exc}") from None
    if not files:
        raise ArtifactError(f"{path}: no *.safetensors weights")
    loaded: set[str] = set()
    unexpected: list[str] = []
    for weights in files:
        if not weights.is_file():
            raise ArtifactError(f"{weights}: weights shard named in {WEIGHTS_INDEX} is missing")
        state = load_file(str(weights))
        state = {name: tensor.to(targets[name].dtype) if name in targets else tensor for name, tensor in state.items()}
        unexpected += model.load_state_dict(state, strict=False, assign=True).unexpected_keys
        loaded.update(state)
        del state
    missing = [key for key in model.state_dict() if key not in loaded]
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if getattr(config, "tie_word_embeddings", False) else set()
    buffers = {name for name, _ in model.named_buffers() if not name.endswith(_GPTQ_BUFFERS)}
    missing = [key for key in missing if key not in tied and key not in buffers]
    if missing or unexpected:
        raise RuntimeError(f"artifact {path}: missing={sorted(missing)} unexpected={sorted(unexpected)}")
    model.tie_weights()
    if config_dict.get("a3q_gptq"):  # keep the record for a re-export
        model.config.a3q_gptq = config_dict["a3q_gptq"]
        if "quantization_config" in config_dict:
            model.config.quantization_config = config_dict["quantization_config"]
    return model


_GPTQ_BUFFERS = (".qweight", ".qzeros", ".scales", ".g_idx")


def _load_offloaded(path: Path, config_dict: dict, dtype: torch.dtype, device: torch.device, mode: str,
                    near: Path | None):
    """The model on the meta device with its embeddings, final norm and LM head loaded on ``device``; decoder
    layers stay in the checkpoint's files (see :mod:`a3q.offload`).

    A dense Llama-family or GPT-2 checkpoint is built directly as a3q's class at full rank (the same logits as
    transformers' class, and the class every compressing stage converts to: converting later would need the layers
    in memory); a3q artifacts and other checkpoints as their own class, with GPTQ/low-rank modules swapped in.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from a3q.arch import LAYER_PREFIX, adapter, family_of
    from a3q.modeling.auto import A3_MODEL_TYPES
    from a3q.modeling.convert import _fill_meta_buffers, a3_config_from_dense
    from a3q.offload import OffloadedLayers, new_store, read_tensors, tensor_files
    from a3q.quant.gptq_linear import replace_with_gptq_linears
    from a3q.modeling.a3q_factored_linear import replace_with_factored_linears

    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = not (config_dict.get("a3q_factorized") or config_dict.get("a3q_gptq"))
    convert = None
    if plain and config.model_type not in A3_MODEL_TYPES:  # names and layouts as the family's adapter maps them
        dense, family_adapter = config, adapter(config)
        convert = lambda tensors: family_adapter.to_compressed_state_dict(tensors, dense)  # noqa: E731
        config = a3_config_from_dense(config)
    with init_empty_weights(include_buffers=True):  # accelerate's meta-device build: no memory for any weight
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if config.model_type not in A3_MODEL_TYPES and config_dict.get("a3q_factorized"):
            replace_with_factored_linears(model, config_dict["a3q_factorized"])
        if config.model_type not in A3_MODEL_TYPES and config_dict.get("a3q_gptq"):
            replace_with_gptq_linears(model, config_dict["a3q_gptq"])
    family = family_of(model.config)
    source = tensor_files(path)
    if not source:
        raise ArtifactError(f"{path}: no *.safetensors weights")
    prefixes = tuple(LAYER_PREFIX[family].format(index=i) for i in range(model.config.num_hidden_layers))
    outside = read_tensors(source, [name for name in source if not name.startswith(prefixes)])
    if convert is not None:
        outside = convert(outside)
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    state = {}
    for name in list(outside):  # one stored copy at a time: the converted tensor replaces the file's
        tensor = outside.pop(name)
        state[name] = tensor.to(device=device, dtype=targets[name].dtype if name in targets else None)
        del tensor
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [key for key in result.missing_keys if not key.startswith(prefixes)]
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if getattr(config, "tie_word_embeddings", False) else set()
    if [key for key in missing if key not in tied] or result.unexpected_keys:
        raise RuntimeError(f"{path}: missing={sorted(missing)} unexpected={sorted(result.unexpected_keys)}")
    model.tie_weights()
    _fill_meta_buffers(model, device, None)  # RoPE tables: derived from the config
    if config_dict.get("a3q_gptq"):  # keep the record for a re-export
        model.config.a3q_gptq = config_dict["a3q_gptq"]
    store = new_store(near) if mode == "disk" else None
    return model, OffloadedLayers(model, family, device, source, convert, store)
