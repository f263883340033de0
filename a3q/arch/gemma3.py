"""Gemma 3 family (``gemma3_text``: Gemma-3-270M, 1B, and text towers): q/k RMSNorm before RoPE, ``(1 + w)``
norm weights, sandwich norms, GeGLU, sliding-window and global layers, one or few KV heads.

The dense class uses a3q's module names, so weights map one to one into ``a3q_gemma3``; how A³ treats the q/k
norms is in :mod:`a3q.stages.a3.qk_norm`.
"""

from __future__ import annotations

from typing import Any

from a3q.arch.family import Family, register_family
from a3q.arch.llama import LLAMA_LINEARS, config_kwargs
from a3q.modeling.modeling_a3q_gemma3 import A3Gemma3Config, A3Gemma3ForCausalLM, A3Gemma3Model


@register_family
class Gemma3(Family):
    def __init__(self) -> None:
        super().__init__(name="gemma3", model_types=("gemma3_text", "a3q_gemma3"), compressed_type="a3q_gemma3",
                         linear_paths=LLAMA_LINEARS, shared_inputs=(("q", "k", "v"), ("gate", "up")),
                         layer_prefix="model.layers.{index}.", layers_path="model.layers", final_norm_path="model.norm",
                         qk_norm_paths=("self_attn.q_norm", "self_attn.k_norm"), norm_weight_offset=1.0)

    def compressed_classes(self):
        return A3Gemma3Config, A3Gemma3Model, A3Gemma3ForCausalLM

    def compressed_config(self, config: Any, **overrides: Any) -> Any:
        config_cls = self.compressed_classes()[0]
        return config_cls(**{**config_kwargs(config, config_cls), **overrides})
