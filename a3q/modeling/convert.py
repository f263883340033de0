"""Dense HF model -> A³ model at full ranks (identical weights), and dense config -> A³ config.

Why full-rank conversion exists: later stages (A³ itself, quantization, LoRA) operate on one model class whose
projections are plain ``nn.Linear`` with per-layer shapes; converting first makes "compress" a pure weight/shape
change and gives a bit-for-bit reference (full ranks reproduce the dense logits).
"""

import copy
import dataclasses
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from a3q.modeling.modeling_a3q_gpt2 import A3GPT2Config, A3GPT2ForCausalLM
from a3q.modeling.modeling_a3q_llama import (
    A3LlamaAttention,
    A3LlamaConfig,
    A3LlamaForCausalLM,
    rope_gather_index,
)

__all__ = ["a3_config_from_dense", "a3_model_from_state_dict", "to_a3_model", "LLAMA_FAMILY", "GPT2_FAMILY"]

from a3q.arch import GPT2_MODEL_TYPES as GPT2_FAMILY  # noqa: E402  (one list of supported model types)
from a3q.arch import LLAMA_MODEL_TYPES as LLAMA_FAMILY  # noqa: E402
# Keys of a dense config dict that must not leak into the A³ config (identity of the dense class / run metadata).
_DROP_KEYS = {"model_type", "architectures", "transformers_version", "auto_map", "_name_or_path"}


def _field_names(config_cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls)}


def _check_no_sliding_window(config: PreTrainedConfig) -> None:
    """Refuse dense configs whose sliding window actually changes attention (A3Llama attends over full context)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return
    layer_types = getattr(config, "layer_types", None)
    uses_window = layer_types is None or "sliding_attention" in layer_types
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        uses_window = False
    if uses_window and window < config.max_position_embeddings:
        raise ValueError(
            f"{config.model_type} config has an active sliding window ({window} < max_position_embeddings="
            f"{config.max_position_embeddings}); A3LlamaForCausalLM only implements full causal attention. "
            "Set sliding_window=None only if the model was trained without it."
        )


def a3_config_from_dense(config: PreTrainedConfig, **overrides: Any) -> A3LlamaConfig | A3GPT2Config:
    """Build the A³ config for a dense Llama/Mistral/Qwen2/GPT-2 config (or copy an A³ config).

    Without overrides the result describes the dense model at full ranks. Typical overrides: ``qk_head_dims``,
    ``vo_head_dims``, ``intermediate_sizes``, ``rope_pairs`` (Llama family). The attention implementation
    (sdpa/eager) is carried over.
    """
    model_type = config.model_type
    src = {k: copy.deepcopy(v) for k, v in config.to_dict().items() if k not in _DROP_KEYS}
    attn_impl = getattr(config, "_attn_implementation", None)
    if model_type in LLAMA_FAMILY:
        _check_no_sliding_window(config)
        kwargs = {k: v for k, v in src.items() if k in _field_names(A3LlamaConfig)}
        kwargs["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if model_type == "qwen2":  # q/k/v biases, no o bias, no MLP bias
            kwargs.update(attention_bias=False, qkv_bias=True, o_bias=False, mlp_bias=False)
        elif model_type == "mistral":
            kwargs.update(attention_bias=False, mlp_bias=False)
        config_cls: type = A3LlamaConfig
    elif model_type in GPT2_FAMILY:
        kwargs = {k: v for k, v in src.items() if k in _field_names(A3GPT2Config)}
        config_cls = A3GPT2Config
    else:
        raise ValueError(f"a3q supports dense llama/mistral/qwen2/gpt2 models, got model_type={model_type!r}.")
    kwargs.update(overrides)
    new = config_cls(**kwargs)
    if attn_impl is not None:
        new._attn_implementation = attn_impl
    return new


def _gpt2_state_dict(dense_sd: dict[str, torch.Tensor], n_embd: int) -> dict[str, torch.Tensor]:
    """Map GPT-2 Conv1D weights ([in, out]) to nn.Linear ([out, in]) and split the fused c_attn into q/k/v."""
    out: dict[str, torch.Tensor] = {}
    for key, value in dense_sd.items():
        if key.endswith("attn.c_attn.weight"):
            prefix = key[: -len("c_attn.weight")]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.split(n_embd, dim=1)):
                out[f"{prefix}{name}.weight"] = part.t()
        elif key.endswith("attn.c_attn.bias"):
            prefix = key[: -len("c_attn.bias")]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.split(n_embd, dim=0)):
                out[f"{prefix}{name}.bias"] = part
        elif key.endswith("attn.c_proj.weight"):
            out[key.replace("attn.c_proj.", "attn.o_proj.")] = value.t()
        elif key.endswith("attn.c_proj.bias"):
            out[key.replace("attn.c_proj.", "attn.o_proj.")] = value
        elif key.endswith(("mlp.c_fc.weight", "mlp.c_proj.weight")):
            out[key] = value.t()
        elif key.endswith(("attn.bias", "attn.masked_bias")):  # legacy causal-mask buffers
            continue
        else:
            out[key] = value
    return out


def _fill_meta_buffers(a3: nn.Module, device: torch.device, reference: nn.Module | None) -> None:
    """Rebuild the non-persistent buffers left on the meta device (rotary inv_freq, RoPE gather index).

    They are derived from the config; when a dense ``reference`` has the same buffer (e.g. a bf16-cast inv_freq) it is
    copied instead, so a full-rank conversion reproduces the dense model bit for bit.
    """
    ref_buffers = dict(reference.named_buffers()) if reference is not None else {}
    for mod_name, module in a3.named_modules():
        meta = [k for k, b in module._buffers.items() if b is not None and b.is_meta]
        for leaf in meta:
            full = f"{mod_name}.{leaf}" if mod_name else leaf
            ref = ref_buffers.get(full)
            if isinstance(module, A3LlamaAttention) and leaf == "rope_index":
                value = rope_gather_index(module.config, module.layer_idx).to(device)
            elif ref is not None and ref.shape == module._buffers[leaf].shape:
                value = ref.detach().to(device).clone()
            elif "RotaryEmbedding" in type(module).__name__:
                with torch.device(device):
                    value = getattr(type(module)(config=module.config), leaf)
            else:
                raise RuntimeError(f"cannot materialize buffer {full!r} of the A3 model")
            module._buffers[leaf] = value


def a3_model_from_state_dict(
    config: A3LlamaConfig | A3GPT2Config,
    state_dict: dict[str, torch.Tensor],
    *,
    device: torch.device | str | None = None,
    reference: nn.Module | None = None,
) -> A3LlamaForCausalLM | A3GPT2ForCausalLM:
    """Instantiate the A³ model for ``config`` directly from ``state_dict`` (A³ key names and shapes).

    Why: building the (possibly large) model normally would randomly initialise every weight only to overwrite it.
    The model is built on the meta device and the given tensors are ASSIGNED (not copied; clone them first if they
    must stay independent). The dtype is the tensors' dtype. ``lm_head.weight`` may be omitted when embeddings are tied.
    """
    cls = A3GPT2ForCausalLM if isinstance(config, A3GPT2Config) else A3LlamaForCausalLM
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
    _fill_meta_buffers(a3, device, reference)
    a3.tie_weights()
    leftover = [n for n, t in list(a3.named_parameters()) + list(a3.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device: {leftover}")
    return a3.eval()


def to_a3_model(model: PreTrainedModel) -> A3LlamaForCausalLM | A3GPT2ForCausalLM:
    """Convert a dense Llama/Mistral/Qwen2/GPT-2 causal LM to the A³ class at full ranks.

    Weights are copied (the dense model stays usable as a reference), dtype/device/train-mode are kept, and the
    dense model's generation config is carried over. An A³ model is returned unchanged.
    """
    model_type = model.config.model_type
    if model_type in ("a3q_llama", "a3q_gpt2"):
        return model
    config = a3_config_from_dense(model.config)
    device = next(model.parameters()).device
    dense_sd = model.state_dict()
    mapped = _gpt2_state_dict(dense_sd, model.config.n_embd) if model_type in GPT2_FAMILY else dict(dense_sd)
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
