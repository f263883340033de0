"""Phi-3 family (``phi3``: Phi-3 mini/medium, Phi-3.5-mini): Llama's layout with two fused projections.

Phi-3 computes q, k and v with one ``qkv_proj`` (rows: the ``h`` query heads, then the ``h_kv`` key heads, then the
``h_kv`` value heads) and gate and up with one ``gate_up_proj`` (gate rows first). A³ gives q/k, v/o and the MLP
different hidden sizes, which one fused matrix with one head size cannot hold, so the weights are split on load into
a3q's Llama-named linears and stay split in the artifact (``a3q_phi3``, loaded through its remote code); only the
maths of the dense model is kept, bit for bit at full rank. Sliding windows (``sliding_window``, every layer) and
``longrope`` scaling carry over; a partial rotary factor below 1 (Phi-4-mini) is refused, because a3q's RoPE layout
rotates every head coordinate.
"""

from __future__ import annotations

from typing import Any

import torch

from a3q.arch.family import Family, register_family
from a3q.arch.llama import LLAMA_LINEARS, config_kwargs
from a3q.modeling.modeling_a3q_phi3 import A3Phi3Config, A3Phi3ForCausalLM, A3Phi3Model


def _split_rows(value: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(value.split(sizes, dim=0))


@register_family
class Phi3(Family):
    def __init__(self) -> None:
        super().__init__(name="phi3", model_types=("phi3", "a3q_phi3"), compressed_type="a3q_phi3",
                         linear_paths=LLAMA_LINEARS, shared_inputs=(("q", "k", "v"), ("gate", "up")),
                         layer_prefix="model.layers.{index}.", layers_path="model.layers", final_norm_path="model.norm")

    def compressed_classes(self):
        return A3Phi3Config, A3Phi3Model, A3Phi3ForCausalLM

    def compressed_config(self, config: Any, **overrides: Any) -> Any:
        config_cls = self.compressed_classes()[0]
        if config.model_type == "phi3":
            partial = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
            if partial != 1.0:
                raise ValueError(f"phi3: partial_rotary_factor={partial} is not supported (a3q rotates whole heads); "
                                 "only models with partial_rotary_factor 1.0 (Phi-3, Phi-3.5) can be compressed.")
        kwargs = config_kwargs(config, config_cls)
        kwargs["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if config.model_type == "phi3":  # neither fused projection has a bias
            kwargs.update(attention_bias=False, mlp_bias=False)
        kwargs.update(overrides)
        return config_cls(**kwargs)

    def to_compressed_state_dict(self, state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
        """``qkv_proj`` → ``q_proj``/``k_proj``/``v_proj`` and ``gate_up_proj`` → ``gate_proj``/``up_proj`` (views of
        the fused tensors' rows: the caller copies what it keeps)."""
        if config.model_type != "phi3":
            return dict(state)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        q_rows, kv_rows = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key.endswith("self_attn.qkv_proj.weight"):
                base = key[: -len("qkv_proj.weight")]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), _split_rows(value, [q_rows, kv_rows, kv_rows])):
                    out[f"{base}{name}.weight"] = part
            elif key.endswith("mlp.gate_up_proj.weight"):
                base = key[: -len("gate_up_proj.weight")]
                gate, up = _split_rows(value, [config.intermediate_size, config.intermediate_size])
                out[f"{base}gate_proj.weight"], out[f"{base}up_proj.weight"] = gate, up
            else:
                out[key] = value
        return out
