"""Llama family: RoPE attention, RMSNorm, SwiGLU MLP; MHA or GQA; Llama, Mistral, Qwen2 (q/k/v biases).

Mistral's sliding window (every layer) and Qwen2's (``use_sliding_window``: the layers from ``max_window_layers``
on) are carried into the compressed config as ``sliding_window`` + ``layer_types``; each compressed layer then
attends over its own window, as the dense one does.

The dense classes already use a3q's module names, so weights map one to one into ``a3q_llama``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from a3q.arch.family import Family, register_family
from a3q.modeling.modeling_a3q_llama import A3LlamaConfig, A3LlamaForCausalLM, A3LlamaModel

LLAMA_LINEARS = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
#: keys of a dense config dict that must not leak into the compressed config (the dense class's identity, metadata)
DROP_KEYS = {"model_type", "architectures", "transformers_version", "auto_map", "_name_or_path"}


def config_kwargs(config: Any, config_cls: type) -> dict[str, Any]:
    """The dense config's fields that ``config_cls`` also has (deep copies)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return {k: copy.deepcopy(v) for k, v in config.to_dict().items() if k not in DROP_KEYS and k in names}


@register_family
class Llama(Family):
    def __init__(self) -> None:
        super().__init__(name="llama", model_types=("llama", "mistral", "qwen2", "a3q_llama"),
                         compressed_type="a3q_llama", linear_paths=LLAMA_LINEARS,
                         shared_inputs=(("q", "k", "v"), ("gate", "up")), layer_prefix="model.layers.{index}.",
                         layers_path="model.layers", final_norm_path="model.norm")

    def compressed_classes(self):
        return A3LlamaConfig, A3LlamaModel, A3LlamaForCausalLM

    def compressed_config(self, config: Any, **overrides: Any) -> Any:
        config_cls = self.compressed_classes()[0]
        kwargs = config_kwargs(config, config_cls)
        kwargs["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if config.model_type == "qwen2":  # q/k/v biases, no o bias, no MLP bias
            kwargs.update(attention_bias=False, qkv_bias=True, o_bias=False, mlp_bias=False)
        elif config.model_type == "mistral":
            kwargs.update(attention_bias=False, mlp_bias=False)
        kwargs.update(overrides)
        return config_cls(**kwargs)
