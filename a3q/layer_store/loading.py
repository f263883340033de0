"""A model built on the meta device with its swapped-in module types, its weights put where its layer store keeps
them: every tensor read into memory, or the decoder layers left in the checkpoint's files (offloaded).

One path for both, used by :func:`a3q.io.loading.load_graph` for every offloaded load and for every folder whose
config records a3q's module types (GPTQ linears, the low-rank baselines' two-factor linears). Why not
``from_pretrained`` for those: it builds dense linears and would drop the factor weights as unexpected keys, and for
a GPTQ checkpoint of a transformers class it would demand gptqmodel (the standard ``quantization_config`` is there for
plain transformers; a3q does not need it). Only the keys of tied weights (the LM head under tied embeddings) may be
absent from the files.

Offloaded, a dense Llama-family or GPT-2 checkpoint is built directly as a3q's class at full rank (the same logits
as transformers' class, and the class every compressing stage converts to: converting later would need the layers
in memory); its layers are converted as they are read (GPT-2's fused ``c_attn`` split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from a3q.arch import LAYER_PREFIX, adapter, family_of
from a3q.graph import LayerStore
from a3q.layer_store.folders import new_store
from a3q.layer_store.offloaded import OffloadedLayers, read_tensors
from a3q.modeling.a3q_module_types import swap_in_recorded_modules
from a3q.arch.auto import A3_MODEL_TYPES
from a3q.arch.convert import a3_config_from_dense, fill_meta_buffers
from a3q.module_types import rebuilt_by_a3q, recorded_types

OFFLOADED = ("cpu", "disk")


def load_on_meta(path: Path, files: list[Path], config_dict: dict[str, Any], dtype: torch.dtype,
                 device: torch.device, offload: str = "none", near: Path | None = None
                 ) -> tuple[nn.Module, LayerStore]:
    """The model of the folder ``path`` (weights in ``files``) and its layer store: in memory (``offload: none``),
    or with the decoder layers left in ``files`` (``cpu``, ``disk``: a store folder made beside ``near``)."""
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):  # transformers would hand the model to that quantizer's library
        del config.quantization_config
    offloaded = offload in OFFLOADED
    convert = None
    if offloaded and not rebuilt_by_a3q(config_dict) and config.model_type not in A3_MODEL_TYPES:
        dense, family_adapter = config, adapter(config)  # names and layouts as the family's adapter maps them
        convert = lambda tensors: family_adapter.to_compressed_state_dict(tensors, dense)  # noqa: E731
        config = a3_config_from_dense(config)
    with init_empty_weights(include_buffers=True):  # accelerate's meta-device build: no memory for any tensor
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        swap_in_recorded_modules(model, config_dict)  # a3q's own classes did it in their constructor (idempotent)
    family = family_of(model.config)
    source = tensor_files(files)
    layers = tuple(LAYER_PREFIX[family].format(index=i) for i in range(model.config.num_hidden_layers))
    kept_in_files = layers if offloaded else ()  # str.startswith(()) is False: in memory, every tensor is read
    _assign(model, read_tensors(source, [name for name in source if not name.startswith(kept_in_files)]), convert,
            device, kept_in_files, path)
    model.tie_weights()
    fill_meta_buffers(model, device, None)  # RoPE tables and the like: derived from the config, in no file
    if convert is None:  # keep the records for a re-export (quantization_config was set aside above)
        for key in [entry.config_key for entry in recorded_types(config_dict)] + ["quantization_config"]:
            if key in config_dict:
                setattr(model.config, key, config_dict[key])
    if not offloaded:
        return model, LayerStore()
    folder = new_store(near) if offload == "disk" else None
    return model, OffloadedLayers(family, device, source, convert, folder)


def _assign(model: nn.Module, tensors: dict[str, Tensor], convert: Any, device: torch.device,
            kept_in_files: tuple[str, ...], path: Path) -> None:
    """Assign ``tensors`` (converted to the model's names and dtypes, on ``device``) in place of the meta ones;
    refuse a file that lacks a tensor the model has (tied weights and layers kept in the files aside) or has one it
    does not."""
    if convert is not None:
        tensors = convert(tensors)
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    state = {}
    for name in list(tensors):  # one stored copy at a time: the converted tensor replaces the file's
        tensor = tensors.pop(name)
        state[name] = tensor.to(device=device, dtype=targets[name].dtype if name in targets else None)
        del tensor
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [key for key in result.missing_keys if not key.startswith(kept_in_files)]
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if getattr(model.config, "tie_word_embeddings",
                                                                               False) else set()
    missing = [key for key in missing if key not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"artifact {path}: missing={sorted(missing)} unexpected={sorted(result.unexpected_keys)}")


def tensor_files(files: list[Path]) -> dict[str, Path]:
    """Tensor name → the safetensors file (of ``files``) holding it."""
    source: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                source[name] = path
    return source
