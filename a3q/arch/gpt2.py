"""GPT-2 family: learned absolute positions (no RoPE), MHA, biases, GELU MLP (not gated).

Dense GPT-2 fuses q/k/v into one Conv1D (``[in, out]`` weights); ``a3q_gpt2`` has separate ``nn.Linear``
projections, so loading splits ``c_attn`` and transposes every Conv1D weight.
"""

from __future__ import annotations

from typing import Any

import torch

from a3q.arch.family import Family, per_layer, register_family
from a3q.arch.llama import config_kwargs
from a3q.graph import LayerStructure
from a3q.modeling.modeling_a3q_gpt2 import A3GPT2Config, A3GPT2ForCausalLM, A3GPT2Model


@register_family
class GPT2(Family):
    def __init__(self) -> None:
        super().__init__(name="gpt2", model_types=("gpt2", "a3q_gpt2"), compressed_type="a3q_gpt2",
                         linear_paths={"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj",
                                       "o": "attn.o_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
                         shared_inputs=(("q", "k", "v"),), layer_prefix="transformer.h.{index}.",
                         layers_path="transformer.h", final_norm_path="transformer.ln_f", uses_rope=False)

    def hidden_size(self, config: Any) -> int:
        return config.n_embd

    def layer_structures(self, config: Any) -> list[LayerStructure]:
        count, head_dim = config.n_layer, config.n_embd // config.n_head
        inner = config.n_inner or 4 * config.n_embd
        qk = per_layer(config, "qk_head_dims", head_dim, count)
        vo = per_layer(config, "vo_head_dims", head_dim, count)
        ff = per_layer(config, "intermediate_sizes", inner, count)
        return [LayerStructure(num_heads=config.n_head, num_kv_heads=config.n_head, head_dim=head_dim,
                               qk_head_dim=qk[i], vo_head_dim=vo[i], intermediate_size=ff[i], gated_mlp=False)
                for i in range(count)]

    def compressed_classes(self):
        return A3GPT2Config, A3GPT2Model, A3GPT2ForCausalLM

    def compressed_config(self, config: Any, **overrides: Any) -> Any:
        config_cls = self.compressed_classes()[0]
        return config_cls(**{**config_kwargs(config, config_cls), **overrides})

    def to_compressed_state_dict(self, state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
        """Conv1D weights (``[in, out]``) → ``nn.Linear`` (``[out, in]``); the fused ``c_attn`` split into q/k/v."""
        if config.model_type != "gpt2":
            return dict(state)
        n_embd, out = config.n_embd, {}
        for key, value in state.items():
            if key.endswith("attn.c_attn.weight"):
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.split(n_embd, dim=1)):
                    out[f"{key[: -len('c_attn.weight')]}{name}.weight"] = part.t()
            elif key.endswith("attn.c_attn.bias"):
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.split(n_embd, dim=0)):
                    out[f"{key[: -len('c_attn.bias')]}{name}.bias"] = part
            elif key.endswith("attn.c_proj.weight"):
                out[key.replace("attn.c_proj.", "attn.o_proj.")] = value.t()
            elif key.endswith("attn.c_proj.bias"):
                out[key.replace("attn.c_proj.", "attn.o_proj.")] = value
            elif key.endswith(("mlp.c_fc.weight", "mlp.c_proj.weight")):
                out[key] = value.t()
            elif not key.endswith(("attn.bias", "attn.masked_bias")):  # legacy causal-mask buffers are dropped
                out[key] = value
        return out
