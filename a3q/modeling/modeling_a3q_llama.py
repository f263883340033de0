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
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
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

from .a3q_bnb_cpu import bitsandbytes_cpu_hook
from .a3q_factored_linear import replace_with_factored_linears
from .a3q_gptq_linear import replace_with_gptq_linears

__all__ = [
    "A3LlamaConfig",
    "A3LlamaAttention",
    "A3LlamaMLP",
    "A3LlamaDecoderLayer",
    "A3LlamaPreTrainedModel",
    "A3LlamaModel",
    "A3LlamaForCausalLM",
    "rope_gather_index",
]

class A3LlamaConfig(LlamaConfig):
    """Llama config plus per-layer A³ shapes. Every extra field defaults to the dense model.

    ``head_dim`` stays the ORIGINAL head dim: the rotary embedding still produces full-size cos/sin, from which each
    layer gathers its kept frequencies.
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

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        n_layers, d = self.num_hidden_layers, self.head_dim
        self.qk_head_dims = [int(r) for r in (self.qk_head_dims or [d] * n_layers)]
        self.vo_head_dims = [int(r) for r in (self.vo_head_dims or [d] * n_layers)]
        self.intermediate_sizes = [int(r) for r in (self.intermediate_sizes or [self.intermediate_size] * n_layers)]
        self.rope_pairs = [
            None if layer is None else [[int(p) for p in head] for head in layer]
            for layer in (self.rope_pairs or [None] * n_layers)
        ]
        self.attention_scale = float(d**-0.5 if self.attention_scale is None else self.attention_scale)
        self.qkv_bias = bool(self.attention_bias if self.qkv_bias is None else self.qkv_bias)
        self.o_bias = bool(self.attention_bias if self.o_bias is None else self.o_bias)
        self._validate_a3()

    def _validate_a3(self) -> None:
        """Fail at config time (not deep inside a forward) on inconsistent shapes."""
        n_layers, d, h, h_kv = self.num_hidden_layers, self.head_dim, self.num_attention_heads, self.num_key_value_heads
        if h % h_kv or d % 2:
            raise ValueError(f"need heads ({h}) divisible by KV heads ({h_kv}) and an even head_dim ({d}).")
        for name in ("qk_head_dims", "vo_head_dims", "intermediate_sizes", "rope_pairs"):
            if len(getattr(self, name)) != n_layers:
                raise ValueError(f"{name} needs one entry per layer ({n_layers}), got {getattr(self, name)}.")
        for l, (r_qk, r_vo, r_ff, pairs) in enumerate(
            zip(self.qk_head_dims, self.vo_head_dims, self.intermediate_sizes, self.rope_pairs)
        ):
            if r_qk < 2 or r_qk > d or r_qk % 2:
                raise ValueError(f"layer {l}: qk head dim {r_qk} must be even and in [2, head_dim={d}].")
            if r_vo < 1 or r_ff < 1:
                raise ValueError(f"layer {l}: vo head dim ({r_vo}) and intermediate size ({r_ff}) must be >= 1.")
            if pairs is None and r_qk != d:
                raise ValueError(f"layer {l}: qk head dim {r_qk} < head_dim {d} requires rope_pairs[{l}].")
            if pairs is not None and len(pairs) != h_kv:
                raise ValueError(f"layer {l}: rope_pairs needs one list per KV head ({h_kv}), got {len(pairs)}.")
            for j, head in enumerate(pairs or []):
                if len(head) != r_qk // 2 or any(not 0 <= p < d // 2 for p in head) or head != sorted(set(head)):
                    raise ValueError(
                        f"layer {l}, KV head {j}: rope_pairs must be {r_qk // 2} sorted distinct pair indices in "
                        f"[0, {d // 2}), got {head}."
                    )
        if getattr(self, "sliding_window", None) is not None or any(
            t != "full_attention" for t in (getattr(self, "layer_types", None) or [])
        ):
            raise ValueError(
                "A3LlamaConfig does not support sliding-window attention (sliding_window / layer_types): the "
                "compressed model would silently attend over the full context instead."
            )


def rope_gather_index(config: A3LlamaConfig, layer_idx: int) -> torch.Tensor:
    """Columns of the full-size cos/sin that each KV group of ``layer_idx`` uses: ``[h_kv, r_qk]`` (int64).

    Row j is ``cat(pairs_j, pairs_j + head_dim // 2)``, matching the within-head coordinate order of q/k rows.
    """
    d, h_kv = config.head_dim, config.num_key_value_heads
    pairs = config.rope_pairs[layer_idx]
    if pairs is None:
        p = torch.arange(d // 2, dtype=torch.long).expand(h_kv, d // 2)
    else:
        p = torch.tensor(pairs, dtype=torch.long).reshape(h_kv, -1)
    return torch.cat([p, p + d // 2], dim=-1).contiguous()


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

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(*input_shape, -1, self.vo_head_dim).transpose(1, 2)

        cos, sin = position_embeddings
        q, k = self._apply_rope(q, k, cos, sin)

        if past_key_values is not None:
            # DynamicCache/StaticCache store keys and values separately, so r_qk != r_vo is fine
            k, v = past_key_values.update(k, v, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class A3LlamaMLP(nn.Module):
    """Gated MLP (LlamaMLP names) with this layer's intermediate size."""

    def __init__(self, config: A3LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_sizes[layer_idx]
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class A3LlamaDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder block; same call signature as LlamaDecoderLayer so LlamaModel.forward drives it."""

    attention_class = A3LlamaAttention  # subclasses for families whose attention differs (Qwen3's q/k norms)

    def __init__(self, config: A3LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
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
    """LlamaModel whose layers have per-layer shapes; forward (masks, rotary, cache) is LlamaModel's."""

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


class A3LlamaForCausalLM(A3LlamaPreTrainedModel, LlamaForCausalLM):
    """Causal LM head over A3LlamaModel; forward, generation and weight tying are LlamaForCausalLM's."""

    base_model_class = A3LlamaModel

    def __init__(self, config: A3LlamaConfig) -> None:
        A3LlamaPreTrainedModel.__init__(self, config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if getattr(config, "a3q_factorized", None):  # two-factor linears of the low-rank baselines (svd, asvd, svd_llm)
            replace_with_factored_linears(self, config.a3q_factorized)
        if getattr(config, "a3q_gptq", None):  # GPTQ-quantized linears (a3q's gptq stage): codes come with the weights
            replace_with_gptq_linears(self, config.a3q_gptq)
        # bitsandbytes 4-bit linears on CPU: exact for A³'s odd shapes (see a3q_bnb_cpu.py); a no-op otherwise
        self.register_forward_pre_hook(bitsandbytes_cpu_hook)
