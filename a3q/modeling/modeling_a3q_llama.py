"""A³-compressed Llama-family causal LM (Llama, Mistral and Qwen2 dense models).

A³ (arXiv 2505.12942) shrinks, per layer, the q/k head dim (``r_qk``), the v/o head dim (``r_vo``) and the MLP
intermediate size. This module runs those smaller shapes with the *same* GEMMs as the dense model (no extra
matmul): the projections simply have fewer rows/columns.

Why this file is self-contained (torch + transformers + stdlib only): it is copied next to exported weights and
loaded with ``trust_remote_code=True`` in a process that never imports ``a3q``.

Weight layout (HF ``[out, in]``, head-major rows as in ``LlamaAttention``), for layer ``l``:

* ``q_proj``: ``[h * r_qk, d_m]``, ``k_proj``: ``[h_kv * r_qk, d_m]``,
  ``v_proj``: ``[h_kv * r_vo, d_m]``, ``o_proj``: ``[d_m, h * r_vo]``.
* Inside a q/k head, the ``r_qk`` coordinates are the ORIGINAL coordinates ``cat(pairs, pairs + head_dim // 2)``
  where ``pairs`` is the sorted list of kept RoPE pairs of the head's KV group (``config.rope_pairs[l][kv]``):
  first coordinates of the kept pairs, then their partners in the same order. ``rotate_half`` on ``r_qk`` dims is
  therefore exactly the dense rotation restricted to the kept pairs, and each pair keeps its original frequency.
* Query head ``i`` belongs to KV group ``i // (h / h_kv)`` (HF GQA) and uses that group's pairs.
* The softmax scale is ``config.attention_scale`` (default: the ORIGINAL ``head_dim ** -0.5``), because A³
  preserves ``q·k``; deriving it from ``r_qk`` would change every attention distribution.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    eager_attention_forward,
    rotate_half,
)

from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .a3q_module_types import prepare_module_types
from .a3q_layer_shapes import normalize_a3_shapes, rope_gather_index

__all__ = [
    "A3LlamaConfig",
    "A3LlamaAttention",
    "A3LlamaMLP",
    "A3LlamaDecoderLayer",
    "A3LlamaPreTrainedModel",
    "A3LlamaModel",
    "A3LlamaForCausalLM",
    "normalize_a3_shapes",
    "rope_gather_index",
]

ATTENTION_TYPES = ("full_attention", "sliding_attention")


class A3LlamaConfig(LlamaConfig):
    """Llama config plus per-layer A³ shapes. Every extra field defaults to the dense model.

    ``head_dim`` stays the ORIGINAL head dim: the rotary embedding still produces full-size cos/sin, from which each
    layer gathers its kept frequencies. ``sliding_window`` and ``layer_types`` carry Mistral's and Qwen2's sliding
    windows (and Phi-3's): without ``layer_types``, every layer slides when ``sliding_window`` is set.
    """

    model_type = "a3q_llama"

    qk_head_dims: list[int] | None = None
    vo_head_dims: list[int] | None = None
    intermediate_sizes: list[int] | None = None
    # per layer: None (all pairs, natural order) or one sorted list of kept pair indices per KV head
    rope_pairs: list | None = None
    attention_scale: float | None = None
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        normalize_a3_shapes(self)
        self.attention_scale = float(self.head_dim**-0.5 if self.attention_scale is None else self.attention_scale)
        self.qkv_bias = bool(self.attention_bias if self.qkv_bias is None else self.qkv_bias)
        self.o_bias = bool(self.attention_bias if self.o_bias is None else self.o_bias)
        default_type = "sliding_attention" if self.sliding_window is not None else "full_attention"
        self.layer_types = list(self.layer_types or [default_type] * self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(ATTENTION_TYPES):
            raise ValueError(f"layer_types needs one of {ATTENTION_TYPES} per layer ({self.num_hidden_layers}), "
                             f"got {self.layer_types}.")
        if "sliding_attention" in self.layer_types and not (self.sliding_window or 0) >= 1:
            raise ValueError(f"sliding_attention layers need a sliding_window >= 1, got {self.sliding_window}.")


class A3LlamaAttention(nn.Module):
    """GQA attention with per-layer ``r_qk`` / ``r_vo`` and RoPE restricted to kept frequency pairs."""

    def __init__(self, config: A3LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim  # original: size of the rotary cos/sin
        self.qk_head_dim = config.qk_head_dims[layer_idx]
        self.vo_head_dim = config.vo_head_dims[layer_idx]
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = config.attention_scale
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        # the window reaches the attention kernel too (flash attention); eager/sdpa get it through the layer's mask
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        # None = dense RoPE layout: apply cos/sin as is (bit-identical to HF, no gather)
        self.natural_rope = config.rope_pairs[layer_idx] is None

        d_m = config.hidden_size
        self.q_proj = nn.Linear(d_m, self.num_heads * self.qk_head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d_m, self.num_key_value_heads * self.qk_head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d_m, self.num_key_value_heads * self.vo_head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.vo_head_dim, d_m, bias=config.o_bias)
        # Non-persistent: derived from the config, so checkpoints hold only weights (re-filled in _init_weights).
        self.register_buffer("rope_index", rope_gather_index(config, layer_idx), persistent=False)

    def _apply_rope(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q ``[b, h, s, r]`` and k ``[b, h_kv, s, r]`` with each KV group's kept frequencies."""
        if self.natural_rope:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # cos/sin: [b, s, head_dim] -> gathered [b, s, h_kv, r] -> [b, h_kv, s, r]
        cos_k = cos[..., self.rope_index].transpose(1, 2)
        sin_k = sin[..., self.rope_index].transpose(1, 2)
        k = k * cos_k + rotate_half(k) * sin_k
        b, h, s, r = q.shape
        # view queries as [b, h_kv, groups, s, r] so one gather serves the whole KV group
        qg = q.reshape(b, self.num_key_value_heads, self.num_key_value_groups, s, r)
        qg = qg * cos_k.unsqueeze(2) + rotate_half(qg) * sin_k.unsqueeze(2)
        return qg.reshape(b, h, s, r), k

    #: the eager kernel when no other attention implementation is configured (families with logit soft-capping
    #: bring their own)
    eager_attention = staticmethod(eager_attention_forward)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[b, h, s, r_qk]``, k ``[b, h_kv, s, r_qk]``, v ``[b, h_kv, s, r_vo]`` before RoPE (families with q/k
        norms override this)."""
        input_shape = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(*input_shape, -1, self.vo_head_dim).transpose(1, 2)
        return q, k, v

    def attention_options(self) -> dict:
        """Extra keyword arguments for the attention kernel (the sliding window; Gemma adds soft-capping)."""
        return {"sliding_window": self.sliding_window}

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        q, k, v = self.project_qkv(hidden_states)
        cos, sin = position_embeddings
        q, k = self._apply_rope(q, k, cos, sin)

        if past_key_values is not None:
            # DynamicCache/StaticCache store keys and values separately, so r_qk != r_vo is fine
            k, v = past_key_values.update(k, v, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self.eager_attention
        )
        attn_output, attn_weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **self.attention_options(),
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class A3LlamaMLP(nn.Module):
    """Gated MLP (LlamaMLP names) with this layer's intermediate size: SwiGLU, or GeGLU for the Gemma families (their
    configs name the activation ``hidden_activation`` and have no MLP biases; the forward is the same)."""

    def __init__(self, config: A3LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_sizes[layer_idx]
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=bias)
        self.act_fn = ACT2FN[getattr(config, "hidden_activation", None) or config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class A3LlamaDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder block; same call signature as LlamaDecoderLayer so LlamaModel.forward drives it."""

    attention_class = A3LlamaAttention  # subclasses for families whose attention differs (Qwen3's q/k norms)

    def __init__(self, config: A3LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.attention_type = config.layer_types[layer_idx]
        self.self_attn = self.attention_class(config=config, layer_idx=layer_idx)
        self.mlp = A3LlamaMLP(config, layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if isinstance(attention_mask, dict):  # the model passes one mask per attention type; this layer's is its own
            attention_mask = attention_mask[self.attention_type]
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class A3LlamaPreTrainedModel(LlamaPreTrainedModel):
    """Shared settings; re-derives the non-persistent RoPE gather index after meta-device loading."""

    config_class = A3LlamaConfig
    config: A3LlamaConfig
    _no_split_modules = ["A3LlamaDecoderLayer"]
    _can_record_outputs = {"hidden_states": A3LlamaDecoderLayer, "attentions": A3LlamaAttention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, A3LlamaAttention):
            index = rope_gather_index(module.config, module.layer_idx).to(module.rope_index.device)
            init.copy_(module.rope_index, index)


class A3LlamaModel(A3LlamaPreTrainedModel, LlamaModel):
    """LlamaModel whose layers have per-layer shapes; forward is LlamaModel's plus a sliding-window mask for the
    layers that slide (Mistral, Qwen2 with ``use_sliding_window``, Phi-3)."""

    decoder_layer_class = A3LlamaDecoderLayer

    def __init__(self, config: A3LlamaConfig) -> None:
        A3LlamaPreTrainedModel.__init__(self, config)  # PreTrainedModel.__init__: skip LlamaModel's dense layers
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([self.decoder_layer_class(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)  # full head_dim cos/sin, original frequencies
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values: Cache | None = None,
                inputs_embeds=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)  # sliding layers keep only their window
        if position_ids is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen).unsqueeze(0)
        mask = attention_mask
        if not isinstance(mask, dict):
            mask_kwargs = {"config": self.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                           "past_key_values": past_key_values, "position_ids": position_ids}
            mask = create_causal_mask(**mask_kwargs)
            if "sliding_attention" in self.config.layer_types:  # one mask per attention type; each layer picks its own
                mask = {"full_attention": mask, "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs)}
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(hidden_states, attention_mask=mask, position_embeddings=position_embeddings,
                                          position_ids=position_ids, past_key_values=past_key_values,
                                          use_cache=use_cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)

class A3LlamaForCausalLM(A3LlamaPreTrainedModel, LlamaForCausalLM):
    """Causal LM head over A3LlamaModel; forward, generation and weight tying are LlamaForCausalLM's."""

    base_model_class = A3LlamaModel

    def __init__(self, config: A3LlamaConfig) -> None:
        A3LlamaPreTrainedModel.__init__(self, config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        prepare_module_types(self)  # recorded GPTQ / low-rank modules, bitsandbytes' CPU path (a3q_module_types.py)
