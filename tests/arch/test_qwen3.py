"""Qwen3 adapter (``a3q.arch.qwen3`` + ``modeling_a3q_qwen3``) on a tiny random config with q/k/v/o biases,
through the shared family checks."""

from __future__ import annotations

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from a3q.arch import family_of
from a3q.arch.auto import to_a3_model
from a3q.modeling.modeling_a3q_qwen3 import A3Qwen3ForCausalLM
from tests.arch.family_checks import check_family

V, D_M, H, H_KV, D, L, FF = 97, 32, 4, 2, 16, 2, 48


def tiny_qwen3(seed: int = 0, eps: float = 1e-6, bias: bool = False) -> Qwen3ForCausalLM:
    """Random tiny Qwen3, 2 KV groups of 2 heads, head dim 16, non-trivial q/k norm gains, sharpened q/k."""
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=V, hidden_size=D_M, intermediate_size=FF, num_hidden_layers=L,
                         num_attention_heads=H, num_key_value_heads=H_KV, head_dim=D, rms_norm_eps=eps,
                         max_position_embeddings=64, attention_bias=bias)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
    return model


def test_family_checks(tmp_path, bias: bool = True):
    """Full rank bit-identical, kept rows = zeroed dense (q/k norms over the kept coordinates), incremental decoding,
    remote-code export (:func:`tests.arch.family_checks.check_family`)."""
    dense = tiny_qwen3(eps=1e-30, bias=bias)
    assert family_of(dense.config) == "qwen3" and type(to_a3_model(dense)) is A3Qwen3ForCausalLM
    check_family(dense, tmp_path, r_qk=8, r_vo=10, r_ff=20)
