"""A³-compressed Qwen3 causal LM: ``modeling_a3q_llama`` plus per-head RMSNorm on q and k before RoPE.

Qwen3 is Llama (RoPE, GQA, SwiGLU, pre-norm) with one difference that A³ notices: ``q_norm``/``k_norm``, an
RMSNorm over each head's ``head_dim`` coordinates with a plain gain ``w`` (not Gemma's ``1 + w``), applied to the
q/k projections before RoPE. In the compressed class they have ``r_qk`` weights: the norm is taken over the kept
coordinates, and ``a3q.stages.a3.qk_norm`` rescales their weights so the expected norm is preserved.

Everything else (per-layer shapes, kept RoPE pairs per KV group in ``config.rope_pairs``, the original softmax
scale ``head_dim ** -0.5``, sliding-window layers) is ``modeling_a3q_llama``'s. Self-contained
(torch + transformers + the sibling files): it is copied next to exported weights for ``trust_remote_code``.
"""

from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from .modeling_a3q_llama import (
    A3LlamaAttention,
    A3LlamaConfig,
    A3LlamaDecoderLayer,
    A3LlamaForCausalLM,
    A3LlamaModel,
)

__all__ = ["A3Qwen3Config", "A3Qwen3Model", "A3Qwen3ForCausalLM"]


class A3Qwen3Config(A3LlamaConfig):
    """Llama-style A³ config for Qwen3 (per-layer shapes; no MLP bias, no o_proj bias unless ``attention_bias``)."""

    model_type = "a3q_qwen3"


class A3Qwen3Attention(A3LlamaAttention):
    """A3LlamaAttention with q/k RMSNorm over the ``r_qk`` kept coordinates of each head, before RoPE."""

    def __init__(self, config: A3Qwen3Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.q_norm = Qwen3RMSNorm(self.qk_head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.qk_head_dim, eps=config.rms_norm_eps)

    def project_qkv(self, hidden_states):
        """q, k, v as in :class:`A3LlamaAttention`, with the norm before the head transpose as Qwen3Attention does
        it (bit-identical at full rank)."""
        input_shape = hidden_states.shape[:-1]
        q = self.q_norm(self.q_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim)).transpose(1, 2)
        v = self.v_proj(hidden_states).view(*input_shape, -1, self.vo_head_dim).transpose(1, 2)
        return q, k, v


class A3Qwen3DecoderLayer(A3LlamaDecoderLayer):
    """A3LlamaDecoderLayer with Qwen3's attention."""

    attention_class = A3Qwen3Attention


class A3Qwen3Model(A3LlamaModel):
    """A3LlamaModel over Qwen3 decoder layers (masks, rotary and cache handling are LlamaModel's)."""

    config_class = A3Qwen3Config
    decoder_layer_class = A3Qwen3DecoderLayer
    _no_split_modules = ["A3Qwen3DecoderLayer"]
    _can_record_outputs = {"hidden_states": A3Qwen3DecoderLayer, "attentions": A3Qwen3Attention}


class A3Qwen3ForCausalLM(A3LlamaForCausalLM):
    """Causal LM head over :class:`A3Qwen3Model` (factored / GPTQ / bnb linears as in A3LlamaForCausalLM)."""

    config_class = A3Qwen3Config
    base_model_class = A3Qwen3Model
    _no_split_modules = ["A3Qwen3DecoderLayer"]
