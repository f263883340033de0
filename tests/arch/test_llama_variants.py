"""Llama-family variants through the shared family checks (:mod:`tests.arch.family_checks`): Mistral with an active
sliding window on every layer, Qwen2 with sliding windows on its upper layers only (``use_sliding_window``,
``max_window_layers``) and q/k/v biases (Llama 3.x RoPE scaling and windowless Mistral/Qwen2 are in
tests/modeling/test_llama.py). Windows are shorter than the test sequences, so
a layer that attended over the full context would fail the bit-identical full-rank check."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from a3q.modeling.modeling_a3q_llama import A3LlamaConfig
from tests.arch.family_checks import check_family

SIZES = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


def _random(model):
    """Non-zero biases, so dropping their rows is checked too."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
    return model.eval()


def tiny_mistral():
    torch.manual_seed(0)
    return _random(MistralForCausalLM(MistralConfig(**SIZES, sliding_window=5)))


def tiny_qwen2():
    torch.manual_seed(0)
    return _random(Qwen2ForCausalLM(Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=4,
                                                max_window_layers=1)))


@pytest.mark.parametrize("make", [tiny_mistral, tiny_qwen2], ids=["mistral", "qwen2"])
def test_family_checks(make, tmp_path):
    check_family(make(), tmp_path, r_qk=8, r_vo=10, r_ff=20, seq=14, prefix=3)


def test_sliding_layers_are_carried_over():
    from a3q.arch.auto import to_a3_model

    qwen2 = to_a3_model(tiny_qwen2()).config
    assert (qwen2.sliding_window, qwen2.layer_types) == (4, ["full_attention"] + ["sliding_attention"] * 2)
    assert to_a3_model(tiny_mistral()).config.layer_types == ["sliding_attention"] * 3


def test_inconsistent_sliding_config_is_refused():
    with pytest.raises(ValueError, match="sliding_window >= 1"):
        A3LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                      layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(ValueError, match="layer_types needs one of"):
        A3LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, layer_types=["chunked_attention"] * 2)
