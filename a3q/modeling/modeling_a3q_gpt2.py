"""A³-compressed GPT-2 causal LM with per-layer q/k head dim, v/o head dim and MLP width.

Why this file is self-contained (torch + transformers + stdlib only): it is copied next to exported weights and
loaded with ``trust_remote_code=True`` in a process that never imports ``a3q``.

Why plain ``nn.Linear`` instead of GPT-2's fused ``Conv1D`` ``c_attn``: A³ gives q/k and v/o different head dims,
so the fused ``[d_m, 3 d_m]`` layout no longer exists, and later stages hook/quantize projections by name in the
usual HF ``[out, in]`` layout. Layout for layer ``l`` (head-major rows, as in GPT-2's split of ``c_attn``):

* ``attn.q_proj``/``attn.k_proj``: ``[h * r_qk, d_m]`` + bias, ``attn.v_proj``: ``[h * r_vo, d_m]`` + bias,
  ``attn.o_proj``: ``[d_m, h * r_vo]`` + bias (GPT-2's ``c_proj``);
* ``mlp.c_fc``: ``[r_ff, d_m]`` + bias, ``mlp.c_proj``: ``[d_m, r_ff]`` + bias.

GPT-2 has no RoPE (learned absolute positions), so q/k coordinates may be any basis (SVD). The softmax scale is
``config.attention_scale`` (default the ORIGINAL ``head_dim ** -0.5``, or 1 if ``scale_attn_weights=False``),
because A³ preserves ``q·k``.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.configuration_gpt2 import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import (
    GPT2LMHeadModel,
    GPT2Model,
    GPT2PreTrainedModel,
    eager_attention_forward,
)
from transformers.utils.output_capturing import OutputRecorder

from .a3q_module_types import prepare_module_types

__all__ = [
    "A3GPT2Config",
    "A3GPT2Attention",
    "A3GPT2MLP",
    "A3GPT2Block",
    "A3GPT2PreTrainedModel",
    "A3GPT2Model",
    "A3GPT2ForCausalLM",
    "A3GPT2LMHeadModel",
]


class A3GPT2Config(GPT2Config):
    """GPT-2 config plus per-layer A³ shapes; every extra field defaults to the dense model."""

    model_type = "a3q_gpt2"

    qk_head_dims: list[int] | None = None
    vo_head_dims: list[int] | None = None
    intermediate_sizes: list[int] | None = None
    attention_scale: float | None = None

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        n_layers, h = self.n_layer, self.n_head
        if self.n_embd % h != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({h}).")
        d = self.n_embd // h
        if self.scale_attn_by_inverse_layer_idx or self.reorder_and_upcast_attn:
            raise ValueError(
                "A3GPT2 does not support scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn: the first changes "
                "the per-layer softmax scale and the second the numerics, neither of which A3GPT2Attention reproduces."
            )
        if self.add_cross_attention:
            raise ValueError("A3GPT2 supports decoder-only GPT-2 (add_cross_attention=False).")
        if self.qk_head_dims is None:
            self.qk_head_dims = [d] * n_layers
        if self.vo_head_dims is None:
            self.vo_head_dims = [d] * n_layers
        if self.intermediate_sizes is None:
            self.intermediate_sizes = [self.n_inner if self.n_inner is not None else 4 * self.n_embd] * n_layers
        self.qk_head_dims = [int(r) for r in self.qk_head_dims]
        self.vo_head_dims = [int(r) for r in self.vo_head_dims]
        self.intermediate_sizes = [int(r) for r in self.intermediate_sizes]
        if self.attention_scale is None:
            self.attention_scale = float(d) ** -0.5 if self.scale_attn_weights else 1.0
        self.attention_scale = float(self.attention_scale)
        for name in ("qk_head_dims", "vo_head_dims", "intermediate_sizes"):
            values = getattr(self, name)
            if len(values) != n_layers:
                raise ValueError(f"{name} has {len(values)} entries, expected n_layer={n_layers}.")
            if any(r < 1 for r in values):
                raise ValueError(f"{name} entries must be >= 1, got {values}.")

    @property
    def head_dim(self) -> int:
        """Original (dense) head dim, for code that reads ``config.head_dim`` as on Llama."""
        return self.n_embd // self.n_head


class A3GPT2Attention(nn.Module):
    """Causal multi-head attention with separate q/k/v/o Linear layers and per-layer r_qk / r_vo."""

    def __init__(self, config: A3GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads  # original
        self.qk_head_dim = config.qk_head_dims[layer_idx]
        self.vo_head_dim = config.vo_head_dims[layer_idx]
        self.scaling = config.attention_scale
        self.is_causal = True
        self.q_proj = nn.Linear(self.embed_dim, self.num_heads * self.qk_head_dim)
        self.k_proj = nn.Linear(self.embed_dim, self.num_heads * self.qk_head_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.num_heads * self.vo_head_dim)
        self.o_proj = nn.Linear(self.num_heads * self.vo_head_dim, self.embed_dim)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(*input_shape, -1, self.qk_head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(*input_shape, -1, self.vo_head_dim).transpose(1, 2)
        if past_key_values is not None:
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
            dropout=self.attn_dropout.p if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*attn_output.shape[:-2], -1).contiguous()
        return self.resid_dropout(self.o_proj(attn_output)), attn_weights


class A3GPT2MLP(nn.Module):
    """GPT-2 MLP (names c_fc / c_proj kept) as nn.Linear with this layer's width."""

    def __init__(self, config: A3GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_sizes[layer_idx]
        self.c_fc = nn.Linear(config.hidden_size, self.intermediate_size)
        self.c_proj = nn.Linear(self.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class A3GPT2Block(GradientCheckpointingLayer):
    """GPT-2 block; same positional call signature as GPT2Block so GPT2Model.forward drives it."""

    def __init__(self, config: A3GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = A3GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = A3GPT2MLP(config, layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = False,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("A3GPT2 has no cross-attention.")
        attn_output, _ = self.attn(
            self.ln_1(hidden_states),
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class A3GPT2PreTrainedModel(GPT2PreTrainedModel):
    """Shared settings; keeps GPT-2's scaled init of the residual output projections."""

    config_class = A3GPT2Config
    config: A3GPT2Config
    _no_split_modules = ["A3GPT2Block"]
    _can_record_outputs = {
        "hidden_states": A3GPT2Block,
        "attentions": OutputRecorder(A3GPT2Attention, layer_name=".attn", index=1),
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range / (2 * self.config.n_layer) ** 0.5
        if isinstance(module, A3GPT2Attention):
            init.normal_(module.o_proj.weight, mean=0.0, std=std)
        elif isinstance(module, A3GPT2MLP):
            init.normal_(module.c_proj.weight, mean=0.0, std=std)


class A3GPT2Model(A3GPT2PreTrainedModel, GPT2Model):
    """GPT2Model with A³ blocks; forward (positions, masks, cache) is GPT2Model's."""

    def __init__(self, config: A3GPT2Config) -> None:
        A3GPT2PreTrainedModel.__init__(self, config)  # PreTrainedModel.__init__: skip GPT2Model's dense blocks
        self.embed_dim = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, self.embed_dim)
        self.wpe = nn.Embedding(config.max_position_embeddings, self.embed_dim)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([A3GPT2Block(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self._attn_implementation = config._attn_implementation
        self.post_init()


class A3GPT2ForCausalLM(A3GPT2PreTrainedModel, GPT2LMHeadModel):
    """LM head over A3GPT2Model; forward, generation and weight tying are GPT2LMHeadModel's."""

    def __init__(self, config: A3GPT2Config) -> None:
        A3GPT2PreTrainedModel.__init__(self, config)
        self.transformer = A3GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()
        prepare_module_types(self)  # recorded GPTQ / low-rank modules, bitsandbytes' CPU path (a3q_module_types.py)


A3GPT2LMHeadModel = A3GPT2ForCausalLM  # GPT-2 naming alias
