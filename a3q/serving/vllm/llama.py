"""vLLM model class for a3q's ``A3LlamaForCausalLM`` artifacts (Llama, Mistral, Qwen2 after A³).

The model is vLLM's own ``LlamaModel`` (embedding, pipeline stages, final norm, torch.compile) over A³ decoder
layers: per-layer q/k and v/o head dims and MLP size, kept RoPE pairs per KV group, the artifact's softmax scale
(``attention_scale``), separate q/k/v and o biases (``qkv_bias``/``o_bias``), sliding windows from ``layer_types``.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.models.llama import LlamaModel
from vllm.model_executor.models.utils import PPMissingLayer, extract_layer_index, maybe_prefix

from a3q.serving.vllm.common import (
    A3MLP,
    A3Attention,
    A3CausalLM,
    check_model_config,
    layer_plan,
    padding_record,
    plan_and_log,
)

__all__ = ["A3LlamaForCausalLM"]

class A3LlamaDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        super().__init__()
        config = config or vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        idx = extract_layer_index(prefix)
        plan = layer_plan(vllm_config)[idx]
        sliding = config.sliding_window if config.layer_types[idx] == "sliding_attention" else None
        self.self_attn = A3Attention(
            config=config, layer=plan, hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
            rope_parameters=getattr(config, "rope_parameters", None),
            max_position=getattr(config, "max_position_embeddings", 8192), scale=config.attention_scale,
            qkv_bias=bool(config.qkv_bias), o_bias=bool(config.o_bias), sliding_window=sliding,
            cache_config=vllm_config.cache_config, quant_config=quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = A3MLP(config.hidden_size, plan, config.hidden_act,
                         bias=bool(getattr(config, "mlp_bias", False)), quant_config=quant_config,
                         prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class A3LlamaForCausalLM(A3CausalLM):
    """``A3LlamaForCausalLM`` for vLLM: LM head and logits over :class:`LlamaModel` with A³ layers."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        check_model_config(vllm_config, "Llama")
        config = vllm_config.model_config.hf_config
        self.config = config
        self.a3q_padding = padding_record(vllm_config, plan_and_log(vllm_config))
        self.model = LlamaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                layer_type=A3LlamaDecoderLayer)
        if get_pp_group().is_last_rank:
            self.lm_head = self.lm_head_for(vllm_config, prefix)
            self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

