"""The adapter registry: one file per family, the tables old call sites index, refusal of unsupported families."""

from __future__ import annotations

import pytest
from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig

from a3q.arch import (FAMILIES, LAYER_PREFIX, LINEAR_PATHS, SHARED_INPUTS,
                      UnsupportedModelError, family_of, layers_from_config,
                      supported_model_types)


def test_every_family_is_registered_and_the_tables_are_views_of_the_adapters():
    assert set(FAMILIES) >= {"llama", "gpt2", "gemma3"}
    for name, family in FAMILIES.items():
        assert LINEAR_PATHS[name] is family.linear_paths and LAYER_PREFIX[name] == family.layer_prefix
        assert SHARED_INPUTS[name] == family.shared_inputs
        assert family.compressed_type in family.model_types
        for model_type in family.model_types:
            assert family_of({"model_type": model_type}) == name
    assert LINEAR_PATHS["llama"]["q"] == "self_attn.q_proj" and LINEAR_PATHS["gpt2"]["up"] == "mlp.c_fc"


def test_an_unsupported_family_is_refused_naming_every_supported_type():
    with pytest.raises(UnsupportedModelError) as error:
        family_of({"model_type": "mamba"})
    assert "model_type 'mamba' is not supported" in str(error.value)
    for model_type in supported_model_types():
        assert model_type in str(error.value)


def test_structure_from_config_alone():
    family, hidden, layers = layers_from_config(Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16))
    assert (family, hidden, len(layers)) == ("gemma3", 32, 3)
    assert (layers[0].num_kv_heads, layers[0].qk_head_dim, layers[0].intermediate_size, layers[0].gated_mlp) == (1, 16, 48, True)
    assert FAMILIES["gemma3"].qk_norm_paths == ("self_attn.q_norm", "self_attn.k_norm")
    assert layers_from_config(LlamaConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2))[0] == "llama"
    family, hidden, layers = layers_from_config(GPT2Config(n_embd=32, n_layer=2, n_head=4))
    assert (family, hidden, layers[0].gated_mlp, FAMILIES[family].uses_rope) == ("gpt2", 32, False, False)
