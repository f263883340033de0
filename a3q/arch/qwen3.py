"""Qwen3 family: Llama's layout (RoPE, GQA, SwiGLU, RMSNorm) plus per-head RMSNorm on q and k before RoPE.

The dense class uses a3q's module names, so weights map one to one into ``a3q_qwen3``. The q/k norms have plain
gains ``w`` (offset 0, unlike Gemma's ``1 + w``); how A³ treats them is :mod:`a3q.stages.a3.qk_norm`, shared with
Gemma 3. Sliding-window layers (``use_sliding_window``) are carried over as in :mod:`a3q.arch.llama`.
"""

from __future__ import annotations

from typing import Any

from a3q.arch.family import Family, register_family
from a3q.arch.llama import LLAMA_LINEARS, config_kwargs
from a3q.modeling.modeling_a3q_qwen3 import A3Qwen3Config, A3Qwen3ForCausalLM, A3Qwen3Model


@register_family
class Qwen3(Family):
    def __init__(self) -> None:
        super().__init__(name="qwen3", model_types=("qwen3", "a3q_qwen3"), compressed_type="a3q_qwen3",
                         linear_paths=LLAMA_LINEARS, shared_inputs=(("q", "k", "v"), ("gate", "up")),
                         layer_prefix="model.layers.{index}.", layers_path="model.layers", final_norm_path="model.norm",
                         qk_norm_paths=("self_attn.q_norm", "self_attn.k_norm"), norm_weight_offset=0.0,
                         qk_norm_head_axis=2)

    def compressed_classes(self):
        return A3Qwen3Config, A3Qwen3Model, A3Qwen3ForCausalLM

    def compressed_config(self, config: Any, **overrides: Any) -> Any:
        config_cls = self.compressed_classes()[0]
        kwargs = config_kwargs(config, config_cls)
        kwargs["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if config.model_type == "qwen3":  # q/k/v/o biases follow attention_bias; the MLP has none
            kwargs.update(mlp_bias=False)
        kwargs.update(overrides)
        return config_cls(**kwargs)
