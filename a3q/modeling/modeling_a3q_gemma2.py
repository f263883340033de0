"""A³-compressed Gemma 2 causal LM (``Gemma2ForCausalLM``: Gemma-2-2B, 9B, 27B).

Gemma 2 differs from Llama where A³ notices: sandwich norms around attention and MLP, ``(1 + w)`` RMSNorm weights,
embeddings scaled by ``sqrt(hidden)``, GeGLU (``gelu_pytorch_tanh``), a softmax scale ``query_pre_attn_scalar ** -0.5``,
tanh soft-capping of the attention logits (``attn_logit_softcapping``) and of the final logits
(``final_logit_softcapping``), a tied LM head, and sliding-window layers interleaved with global ones (``layer_types``).
Unlike Gemma 3 (``modeling_a3q_gemma3``) it has no q/k norms and one RoPE base for every layer, so one cos/sin table
serves all layers and only the masks differ per layer type. This class keeps all of that and makes the three A³ sizes
per-layer, in ``modeling_a3q_llama``'s layout:

* ``q_proj`` ``[h * r_qk, d_m]``, ``k_proj`` ``[h_kv * r_qk, d_m]``, ``v_proj`` ``[h_kv * r_vo, d_m]``,
  ``o_proj`` ``[d_m, h * r_vo]``; kept RoPE pairs per KV head in ``config.rope_pairs[l]`` (kept first coordinates,
  then their partners), gathered from the full-size cos/sin.
* The softmax scale stays ``query_pre_attn_scalar ** -0.5`` whatever ``r_qk`` is, and the attention soft-cap acts on
  the same scaled ``q·k``: A³ preserves ``q·k``, so the capped logits it approximates are the dense ones.

The model passes every decoder layer the masks of *all* layer types (a dict) and each layer picks its own, so a layer
run alone on layer 0's captured inputs (the calibration pipeline) sees exactly what it sees in a full forward.
Self-contained (torch + transformers + the sibling files): it is copied next to exported weights for
``trust_remote_code``.
"""

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.gemma2.configuration_gemma2 import Gemma2Config
from transformers.models.gemma2.modeling_gemma2 import (
    Gemma2Attention,
    Gemma2DecoderLayer,
    Gemma2ForCausalLM,
    Gemma2Model,
    Gemma2PreTrainedModel,
    Gemma2RMSNorm,
    Gemma2RotaryEmbedding,
    Gemma2TextScaledWordEmbedding,
)
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager_attention

from .a3q_module_types import prepare_module_types
from .a3q_layer_shapes import CausalA3Shapes, rope_gather_index
from .modeling_a3q_llama import A3LlamaAttention, A3LlamaMLP, A3LlamaModel

__all__ = ["A3Gemma2Config", "A3Gemma2Model", "A3Gemma2ForCausalLM"]


class A3Gemma2Config(CausalA3Shapes, Gemma2Config):
    """Gemma 2 config plus per-layer A³ shapes (:class:`CausalA3Shapes`; every extra field defaults to the dense
    model).

    ``head_dim`` stays the ORIGINAL head dim: the rotary embedding produces full-size cos/sin, from which each layer
    gathers its kept frequencies.
    """

    model_type = "a3q_gemma2"


class A3Gemma2Attention(Gemma2Attention):
    """Gemma 2 attention at ``r_qk``/``r_vo`` with RoPE on the kept pairs; projection, RoPE and the kernel call are
    :class:`A3LlamaAttention`'s (bit-identical to Gemma2Attention at full rank), with Gemma 2's soft-capping kernel."""

    _apply_rope = A3LlamaAttention._apply_rope
    project_qkv = A3LlamaAttention.project_qkv
    forward = A3LlamaAttention.forward
    eager_attention = staticmethod(gemma2_eager_attention)

    def __init__(self, config: A3Gemma2Config, layer_idx: int) -> None:
        nn.Module.__init__(self)  # not Gemma2Attention.__init__: it would build full-size projections
        self.config, self.layer_idx = config, layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.head_dim = config.head_dim  # original: size of the rotary cos/sin
        self.qk_head_dim, self.vo_head_dim = config.qk_head_dims[layer_idx], config.vo_head_dims[layer_idx]
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = config.query_pre_attn_scalar**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        h, h_kv, d_m = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
        bias = config.attention_bias
        self.q_proj = nn.Linear(d_m, h * self.qk_head_dim, bias=bias)
        self.k_proj = nn.Linear(d_m, h_kv * self.qk_head_dim, bias=bias)
        self.v_proj = nn.Linear(d_m, h_kv * self.vo_head_dim, bias=bias)
        self.o_proj = nn.Linear(h * self.vo_head_dim, d_m, bias=bias)
        self.attn_logit_softcapping = config.attn_logit_softcapping
        # the window reaches the attention kernel too (flash attention); eager gets it through the layer's mask
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None
        self.natural_rope = config.rope_pairs[layer_idx] is None  # dense layout: cos/sin as is, no gather
        # non-persistent: derived from the config, so checkpoints hold only weights (re-filled in _init_weights)
        self.register_buffer("rope_index", rope_gather_index(config, layer_idx), persistent=False)

    def attention_options(self) -> dict:
        return {"sliding_window": self.sliding_window, "softcap": self.attn_logit_softcapping}


class A3Gemma2DecoderLayer(Gemma2DecoderLayer):
    """Gemma 2's sandwich-norm block (HF's forward); takes every layer type's mask and uses its own."""

    def __init__(self, config: A3Gemma2Config, layer_idx: int) -> None:
        GradientCheckpointingLayer.__init__(self)
        self.config, self.hidden_size = config, config.hidden_size
        self.attention_type = config.layer_types[layer_idx]  # also read by the calibration pipeline's recorder
        self.self_attn = A3Gemma2Attention(config, layer_idx)
        self.mlp = A3LlamaMLP(config, layer_idx)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, Gemma2RMSNorm(self.hidden_size, eps=config.rms_norm_eps))

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        if isinstance(attention_mask, dict):
            attention_mask = attention_mask[self.attention_type]
        return super().forward(hidden_states, attention_mask=attention_mask, **kwargs)


class A3Gemma2PreTrainedModel(Gemma2PreTrainedModel):
    """Shared settings (no SDPA: it cannot soft-cap, as in HF); re-derives the RoPE gather index after meta loading."""

    config_class = A3Gemma2Config
    config: A3Gemma2Config
    _no_split_modules = ["A3Gemma2DecoderLayer"]
    _can_record_outputs = {"hidden_states": A3Gemma2DecoderLayer, "attentions": A3Gemma2Attention}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, A3Gemma2Attention):
            index = rope_gather_index(module.config, module.layer_idx).to(module.rope_index.device)
            init.copy_(module.rope_index, index)


class A3Gemma2Model(A3Gemma2PreTrainedModel, Gemma2Model):
    """Gemma2Model with per-layer shapes. Its forward is :class:`A3LlamaModel`'s: one rotary table for all layers,
    and a dict of masks (full and sliding) when any layer slides, from which each layer picks its own."""

    forward = A3LlamaModel.forward

    def __init__(self, config: A3Gemma2Config) -> None:
        A3Gemma2PreTrainedModel.__init__(self, config)  # PreTrainedModel.__init__: skip Gemma2Model's dense layers
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embed_tokens = Gemma2TextScaledWordEmbedding(config.vocab_size, config.hidden_size, self.padding_idx,
                                                          embed_scale=config.hidden_size**0.5)
        self.layers = nn.ModuleList([A3Gemma2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Gemma2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Gemma2RotaryEmbedding(config)  # full head_dim cos/sin, original frequencies
        self.gradient_checkpointing = False
        self.post_init()


class A3Gemma2ForCausalLM(A3Gemma2PreTrainedModel, Gemma2ForCausalLM):
    """Gemma2ForCausalLM over :class:`A3Gemma2Model` (final-logit soft-capping and tied LM head as in HF)."""

    def __init__(self, config: A3Gemma2Config) -> None:
        A3Gemma2PreTrainedModel.__init__(self, config)
        self.model = A3Gemma2Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        prepare_module_types(self)  # recorded GPTQ / low-rank modules, bitsandbytes' CPU path (a3q_module_types.py)
