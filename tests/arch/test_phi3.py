"""Phi-3 adapter (``a3q.arch.phi3``): fused ``qkv_proj``/``gate_up_proj`` split on load, through the shared family
checks (:mod:`tests.arch.family_checks`), with GQA and an active sliding window; ``longrope`` scaling converts (to the last
bits: see ``check_family``); a partial rotary factor is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM

from a3q.arch.auto import to_a3_model
from tests.arch.family_checks import check_family, logits, token_ids

SIZES = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_phi3(**extra) -> Phi3ForCausalLM:
    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(**SIZES, **extra)).eval()


def test_family_checks(tmp_path):
    check_family(tiny_phi3(sliding_window=5), tmp_path, r_qk=4, r_vo=6, r_ff=20, seq=14, prefix=3, bit_identical=False)


def test_fused_projections_are_split_in_order():
    dense = tiny_phi3()
    full = to_a3_model(dense)
    fused, attention = dense.model.layers[1].self_attn.qkv_proj.weight, full.model.layers[1].self_attn
    assert torch.equal(torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]), fused)
    mlp = full.model.layers[1].mlp
    assert torch.equal(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), dense.model.layers[1].mlp.gate_up_proj.weight)


def test_longrope_converts_bit_for_bit():
    half = 8 // 2  # head_dim 8: four frequency pairs
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.2, 1.3][:half],
            "long_factor": [2.0, 2.5, 3.0, 3.5][:half], "original_max_position_embeddings": 16}
    dense = tiny_phi3(rope_parameters=rope, original_max_position_embeddings=16)
    ids = token_ids(97, seq=24)  # past the original context: the long factors are in use
    torch.testing.assert_close(logits(to_a3_model(dense), ids), logits(dense, ids), rtol=1e-6, atol=1e-6)


def test_partial_rotary_is_refused():
    dense = tiny_phi3(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        to_a3_model(dense)
