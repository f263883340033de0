"""vLLM model class for a3q's ``A3Gemma3ForCausalLM`` artifacts (Gemma 3 text models after A³).

As vLLM's own Gemma 3 (``vllm/model_executor/models/gemma3.py``): embeddings scaled by ``sqrt(hidden)``, sandwich
norms with ``(1 + w)`` gains, GeGLU, softmax scale ``query_pre_attn_scalar**-0.5``, sliding-window layers with their
own RoPE base, final-logit soft-capping; plus A³'s per-layer sizes, q/k norms over the kept ``r_qk`` coordinates
(a3q's ``qk_norm`` modes all serve this way: they differ in which pairs were kept and the norm gains, both in the
weights), and kept RoPE pairs gathered from each layer type's own table.
"""

from __future__ import annotations

from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.layernorm import GemmaRMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.models.utils import (
    extract_layer_index,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from a3q.serving.vllm.common import (
    A3MLP,
    A3Attention,
    A3CausalLM,
    check_model_config,
    layer_plan,
    padding_record,
    plan_and_log,
)

__all__ = ["A3Gemma3ForCausalLM"]


class A3Gemma3DecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        idx = extract_layer_index(prefix)
        plan = layer_plan(vllm_config)[idx]
        layer_type = config.layer_types[idx]
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("a3q's Gemma 3 class serves causal attention only")
        self.self_attn = A3Attention(
            config=config, layer=plan, hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
            rope_parameters=config.rope_parameters[layer_type], max_position=config.max_position_embeddings,
            scale=config.query_pre_attn_scalar**-0.5, qkv_bias=bool(config.attention_bias),
            o_bias=bool(config.attention_bias),
            sliding_window=config.sliding_window if layer_type == "sliding_attention" else None,
            logits_soft_cap=getattr(config, "attn_logit_softcapping", None), qk_norm_eps=config.rms_norm_eps,
            cache_config=vllm_config.cache_config, quant_config=quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = A3MLP(config.hidden_size, plan, config.hidden_activation,
                         quant_config=quant_config, prefix=f"{prefix}.mlp")
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps=eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps=eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps=eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.post_attention_layernorm(self.self_attn(positions=positions, hidden_states=hidden_states))
        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden_states)), residual


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "intermediate_tensors": 0,
                                         "inputs_embeds": 0})
class A3Gemma3Model(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=vllm_config.quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, lambda prefix: A3Gemma3DecoderLayer(vllm_config, prefix=prefix),
            prefix=f"{prefix}.layers")
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # sqrt(hidden) in the model dtype, as transformers' Gemma3TextScaledWordEmbedding and vLLM's Gemma 3
        self.register_buffer("normalizer", torch.tensor(config.hidden_size**0.5), persistent=False)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.normalizer

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden_states, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual, **kwargs)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class A3Gemma3ForCausalLM(A3CausalLM):
    """``A3Gemma3ForCausalLM`` for vLLM (tied LM head, final-logit soft-capping)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        check_model_config(vllm_config, "Gemma 3")
        config = vllm_config.model_config.hf_config
        self.config = config
        self.a3q_padding = padding_record(vllm_config, plan_and_log(vllm_config))
        self.model = A3Gemma3Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = self.lm_head_for(vllm_config, prefix)
        self.logits_processor = LogitsProcessor(config.vocab_size, soft_cap=config.final_logit_softcapping)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
