"""Dense HF model -> A³ model at full ranks (identical weights), and dense config -> A³ config.

Why full-rank conversion exists: later stages (A³ itself, quantization, LoRA) operate on one model class whose
projections are plain ``nn.Linear`` with per-layer shapes; converting first makes "compress" a pure weight/shape
change and gives a bit-for-bit reference (full ranks reproduce the dense logits).
"""

import copy
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from a3q.arch import FAMILIES, adapter, supported_model_types
from a3q.modeling.modeling_a3q_llama import rope_gather_index

__all__ = ["a3_config_from_dense", "a3_model_from_state_dict", "fill_meta_buffers", "to_a3_model", "LLAMA_FAMILY",
           "GPT2_FAMILY"]

LLAMA_FAMILY = FAMILIES["llama"].model_types  # kept names: the model types of each family
GPT2_FAMILY = FAMILIES["gpt2"].model_types
_COMPRESSED_TYPES = {family.compressed_type for family in FAMILIES.values()}


def a3_config_from_dense(config: PreTrainedConfig, **overrides: Any) -> PreTrainedConfig:
    """The A³ config of a dense config of any supported family (or a copy of an A³ config), via its adapter.

    Without overrides the result describes the dense model at full ranks. Typical overrides: ``qk_head_dims``,
    ``vo_head_dims``, ``intermediate_sizes``, ``rope_pairs`` (RoPE families). The attention implementation
    (sdpa/eager) is carried over.
    """
    if config.model_type not in supported_model_types():
        raise ValueError(f"a3q supports the model types {', '.join(supported_model_types())}, "
                         f"got model_type={config.model_type!r}.")
    attn_impl = getattr(config, "_attn_implementation", None)
    new = adapter(config).compressed_config(config, **overrides)
    if attn_impl is not None:
        new._attn_implementation = attn_impl
    return new


def fill_meta_buffers(a3: nn.Module, device: torch.device, reference: nn.Module | None) -> None:
    """Rebuild the non-persistent buffers left on the meta device (rotary inv_freq, RoPE gather index).

    They are derived from the config; when a dense ``reference`` has the same buffer (e.g. a bf16-cast inv_freq) it is
    copied instead, so a full-rank conversion reproduces the dense model bit for bit. Besides the conversion here,
    only the layer store calls it (:mod:`a3q.layer_store`: models and layers built on the meta device).
    """
    ref_buffers = dict(reference.named_buffers()) if reference is not None else {}
    for mod_name, module in a3.named_modules():
        meta = [k for k, b in module._buffers.items()
                if b is not None and b.is_meta and k in module._non_persistent_buffers_set]
        for leaf in meta:
            full = f"{mod_name}.{leaf}" if mod_name else leaf
            ref = ref_buffers.get(full)
            if leaf == "rope_index":  # every RoPE family's attention: kept pairs per KV group, from the config
                value = rope_gather_index(module.config, module.layer_idx).to(device)
            elif leaf == "embed_scale" and hasattr(module, "scalar_embed_scale"):  # Gemma's sqrt(hidden) embedding scale
                value = torch.tensor(module.scalar_embed_scale, device=device)
            elif ref is not None and ref.shape == module._buffers[leaf].shape:
                value = ref.detach().to(device).clone()
            elif "RotaryEmbedding" in type(module).__name__:
                with torch.device(device):
                    value = getattr(type(module)(config=module.config), leaf)
            else:
                raise RuntimeError(f"cannot materialize buffer {full!r} of the A3 model")
            module._buffers[leaf] = value


def a3_model_from_state_dict(
    config: PreTrainedConfig,
    state_dict: dict[str, torch.Tensor],
    *,
    device: torch.device | str | None = None,
    reference: nn.Module | None = None,
) -> PreTrainedModel:
    """Instantiate the A³ model for ``config`` directly from ``state_dict`` (A³ key names and shapes).

    Why: building the (possibly large) model normally would randomly initialise every weight only to overwrite it.
    The model is built on the meta device and the given tensors are ASSIGNED (not copied; clone them first if they
    must stay independent). The dtype is the tensors' dtype. ``lm_head.weight`` may be omitted when embeddings are tied.
    """
    cls = adapter(config).compressed_classes()[2]
    first = next(iter(state_dict.values()))
    device = torch.device(device) if device is not None else first.device
    floats = [t for t in state_dict.values() if t.is_floating_point()]
    if floats:
        config.dtype = floats[0].dtype
    with torch.device("meta"):
        a3 = cls(config)
    expected = set(a3.state_dict().keys())
    tied = set(getattr(a3, "all_tied_weights_keys", {}) or {}) if config.tie_word_embeddings else set()
    missing, unexpected = expected - set(state_dict) - tied, set(state_dict) - expected
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={sorted(missing)} unexpected={sorted(unexpected)}")
    a3.load_state_dict({k: v.to(device) for k, v in state_dict.items()}, strict=False, assign=True)
    fill_meta_buffers(a3, device, reference)
    a3.tie_weights()
    leftover = [n for n, t in list(a3.named_parameters()) + list(a3.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device: {leftover}")
    return a3.eval()


def to_a3_model(model: PreTrainedModel) -> PreTrainedModel:
    """Convert a dense causal LM of any supported family to the A³ class at full ranks.

    Weights are copied (the dense model stays usable as a reference), dtype/device/train-mode are kept, and the
    dense model's generation config is carried over. An A³ model is returned unchanged.
    """
    model_type = model.config.model_type
    if model_type in _COMPRESSED_TYPES:
        return model
    config = a3_config_from_dense(model.config)
    device = next(model.parameters()).device
    dense_sd = model.state_dict()
    mapped = adapter(model.config).to_compressed_state_dict(dense_sd, model.config)
    # copy each distinct storage once, so tied tensors stay shared and nothing aliases the dense model
    memo: dict[tuple, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for key, value in mapped.items():
        ident = (value.data_ptr(), tuple(value.shape), value.stride(), value.dtype)
        if ident not in memo:
            memo[ident] = value.detach().to(device).clone(memory_format=torch.contiguous_format)
        state[key] = memo[ident]
    a3 = a3_model_from_state_dict(config, state, device=device, reference=model)
    if getattr(model, "generation_config", None) is not None:
        a3.generation_config = copy.deepcopy(model.generation_config)
    a3.train(model.training)
    return a3
