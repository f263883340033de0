"""A³-compressed Gemma 3 text model (``Gemma3ForCausalLM``: Gemma-3-270M/1B and the text towers of larger ones).

Gemma 3 differs from Llama where A³ notices: per-head RMSNorm on q and k *before* RoPE (``(1 + w)`` weights),
sandwich norms around attention and MLP, embeddings scaled by ``sqrt(hidden)``, GeGLU (``gelu_pytorch_tanh``), a
softmax scale ``query_pre_attn_scalar ** -0.5``, and sliding-window layers (local RoPE base, window) interleaved with
global ones (global base). This class keeps all of that and makes the three A³ sizes per-layer:

* ``q_proj`` ``[h * r_qk, d_m]``, ``k_proj`` ``[h_kv * r_qk, d_m]``, ``v_proj`` ``[h_kv * r_vo, d_m]``,
  ``o_proj`` ``[d_m, h * r_vo]``; ``q_norm``/``k_norm`` have ``r_qk`` weights: the norm is taken over the kept
  coordinates (``a3q.stages.a3.qk_norm`` rescales their weights so the expected norm is preserved).
* Kept RoPE pairs per KV head in ``config.rope_pairs[l]``, the same layout as ``modeling_a3q_llama`` (kept first
  coordinates, then their partners); each layer gathers them from its own layer type's cos/sin.
* The softmax scale stays ``query_pre_attn_scalar ** -0.5`` whatever ``r_qk`` is: A³ preserves ``q·k``.

Every decoder layer receives the position embeddings and masks of *all* layer types (dicts) and picks its own,
so a layer run alone on layer 0's captured inputs (the calibration pipeline) sees exactly what it sees in a full
forward. Self-contained (torch + transformers + the sibling helper files): it is copied next to exported weights.
"""

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import (
    Gemma3Attention,
    Gemma3DecoderLayer,
    Gemma3ForCausalLM,
    Gemma3PreTrainedModel,
    Gemma3RMSNorm,
    Gemma3RotaryEmbedding,
    Gemma3TextModel,
    Gemma3TextScaledWordEmbedding,
)
from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward as gemma3_eager_attention
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .a3q_module_types import prepare_module_types
from .a3q_layer_shapes import CausalA3Shapes, rope_gather_index
from .modeling_a3q_llama import A3LlamaAttention, A3LlamaMLP

__all__ = ["A3Gemma3Config", "A3Gemma3Model", "A3Gemma3ForCausalLM"]


class A3Gemma3Config(CausalA3Shapes, Gemma3TextConfig):
    """Gemma 3 text config plus per-layer A³ shapes (:class:`CausalA3Shapes`; every extra field defaults to the
    dense model)."""

    model_type = "a3q_gemma3"


class A3Gemma3Attention(Gemma3Attention):
    """Gemma 3 attention at ``r_qk``/``r_vo``: q/k norms over the kept coordinates, RoPE on the kept pairs."""

    _apply_rope = A3LlamaAttention._apply_rope

    def __init__(self, config: A3Gemma3Config, layer_idx: int) -> None:
        nn.Module.__init__(self)
        self.layer_type = config.layer_types[layer_idx]
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.head_dim
        self.qk_head_dim, self.vo_head_dim = config.qk_head_dims[layer_idx], config.vo_head_dims[layer_idx]
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        h, h_kv, d_m, bias = config.num_attention_heads, config.num_key_value_heads, config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d_m, h * self.qk_head_dim, bias=bias)
        self.k_proj = nn.Linear(d_m, h_kv * self.qk_head_dim, bias=bias)
        self.v_proj = nn.Linear(d_m, h_kv * self.vo_head_dim, bias=bias)
        self.o_proj = nn.Linear(h * self.vo_head_dim, d_m, bias=bias)
        self.attn_logit_softcapping = config.attn_logit_softcapping
        self.is_sliding = self.layer_type == "sliding_attention"
        self.sliding_window = config.sliding_window if self.is_sliding else None
        self.q_norm = Gemma3RMSNorm(dim=self.qk_head_dim, eps=config.rms_norm_eps)
        self.k_norm = Gemma3RMSNorm(dim=self.qk_head_dim, eps=config.rms_norm_eps)
        self.natural_rope = config.rope_pairs[layer_idx] is None
        self.register_buffer("rope_index", rope_gather_index(config, layer_idx), persistent=False)

    forward = A3LlamaAttention.forward
    eager_attention = staticmethod(gemma3_eager_attention)

    def project_qkv(self, hidden_states):
        """q, k, v as in :class:`A3LlamaAttention`, with the norm after the head transpose as Gemma3Attention does
        it (bit-identical at full rank)."""
        input_shape = hidden_states.shape[:-1]
        q = self.q_norm(self.q_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim).transpose(1, 2))
        k = self.k_norm(self.k_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim).transpose(1, 2))
        v = self.v_proj(hidden_states).view(*input_shape, -1, self.vo_head_dim).transpose(1, 2)
        return q, k, v

    def attention_options(self) -> dict:
        return {"sliding_window": self.sliding_window, "softcap": self.attn_logit_softcapping}


class A3Gemma3DecoderLayer(Gemma3DecoderLayer):
    """Gemma 3's sandwich-norm block; takes every layer type's masks/position embeddings and uses its own."""

    def __init__(self, config: A3Gemma3Config, layer_idx: int) -> None:
        GradientCheckpointingLayer.__init__(self)
        self.config, self.hidden_size, self.layer_idx = config, config.hidden_size, layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.self_attn = A3Gemma3Attention(config, layer_idx)
        self.mlp = A3LlamaMLP(config, layer_idx)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, Gemma3RMSNorm(self.hidden_size, eps=config.rms_norm_eps))

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        if isinstance(position_embeddings, dict):
            position_embeddings = position_embeddings[self.layer_type]
        if isinstance(attention_mask, dict):
            attention_mask = attention_mask[self.layer_type]
        return super().forward(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                               **kwargs)


class A3Gemma3PreTrainedModel(Gemma3PreTrainedModel):
    config_class = A3Gemma3Config
    config: A3Gemma3Config
    input_modalities = ("text",)
    _no_split_modules = ["A3Gemma3DecoderLayer"]
    _can_record_outputs = {"hidden_states": A3Gemma3DecoderLayer, "attentions": A3Gemma3Attention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, A3Gemma3Attention):
            init.copy_(module.rope_index, rope_gather_index(module.config, module.layer_idx).to(module.rope_index.device))


class A3Gemma3Model(A3Gemma3PreTrainedModel, Gemma3TextModel):
    """Gemma3TextModel with per-layer shapes; each layer gets the dicts of masks and position embeddings."""

    def __init__(self, config: A3Gemma3Config) -> None:
        A3Gemma3PreTrainedModel.__init__(self, config)
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embed_tokens = Gemma3TextScaledWordEmbedding(config.vocab_size, config.hidden_size, self.padding_idx,
                                                          embed_scale=config.hidden_size**0.5)
        self.layers = nn.ModuleList([A3Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Gemma3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Gemma3RotaryEmbedding(config)
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
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen).unsqueeze(0)
        masks = attention_mask
        if not isinstance(masks, dict):
            mask_kwargs = {"config": self.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                           "past_key_values": past_key_values, "position_ids": position_ids}
            masks = {"full_attention": create_causal_mask(**mask_kwargs),
                     "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs)}
        hidden = inputs_embeds
        rotary = {t: self.rotary_emb(hidden, position_ids, t) for t in sorted(set(self.config.layer_types))}
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden = layer(hidden, attention_mask=masks, position_embeddings=rotary, position_ids=position_ids,
                           past_key_values=past_key_values, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), past_key_values=past_key_values)


class A3Gemma3ForCausalLM(A3Gemma3PreTrainedModel, Gemma3ForCausalLM):
    """Gemma3ForCausalLM over :class:`A3Gemma3Model` (final-logit softcapping and tied LM head as in HF)."""

    def __init__(self, config: A3Gemma3Config) -> None:
        A3Gemma3PreTrainedModel.__init__(self, config)
        self.model = A3Gemma3Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        prepare_module_types(self)  # recorded GPTQ / low-rank modules, bitsandbytes' CPU path (a3q_module_types.py)
