"""Gemma 2 family (``gemma2``: Gemma-2-2B, 9B, 27B): Llama's linears with Gemma's layer around them.

What differs from Llama: ``(1 + w)`` RMSNorm weights, sandwich norms (after attention and around the MLP), embeddings
scaled by ``sqrt(hidden)``, GeGLU, a softmax scale ``query_pre_attn_scalar ** -0.5`` rather than ``head_dim ** -0.5``,
tanh soft-capping of the attention and final logits, a tied LM head, and sliding-window layers alternating with global
ones. What differs from Gemma 3 (:mod:`a3q.arch.gemma3`): no q/k norms (so A³'s q/k objective is Llama's, with no
norm rescaling) and one RoPE base for every layer.

The dense class uses a3q's module names, so weights map one to one into ``a3q_gemma2``.
"""

from __future__ import annotations

from typing import Any

from a3q.arch.family import Family, register_family
from a3q.arch.llama import LLAMA_LINEARS, config_kwargs
from a3q.modeling.modeling_a3q_gemma2 import A3Gemma2Config, A3Gemma2ForCausalLM, A3Gemma2Model


@register_family
class Gemma2(Family):
    def __init__(self) -> None:
        super().__init__(name="gemma2", model_types=("gemma2", "a3q_gemma2"), compressed_type="a3q_gemma2",
                         linear_paths=LLAMA_LINEARS, shared_inputs=(("q", "k", "v"), ("gate", "up")),
                         layer_prefix="model.layers.{index}.", layers_path="model.layers", final_norm_path="model.norm",
                         norm_weight_offset=1.0)

    def compressed_classes(self):
        return A3Gemma2Config, A3Gemma2Model, A3Gemma2ForCausalLM

    def compressed_config(self, config: Any, **overrides: Any) -> Any:
        config_cls = self.compressed_classes()[0]
        return config_cls(**{**config_kwargs(config, config_cls), **overrides})
