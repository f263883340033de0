"""ModelGraph sizes: parameter counts and KV bytes follow the documented formulas."""

from __future__ import annotations

import torch


def test_smollm2_structure_and_counts(smollm2):
    layer = smollm2.layers[0]
    assert len(smollm2.layers) == 30 and smollm2.family == "llama" and smollm2.uses_rope
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.intermediate_size) == (9, 3, 64, 1536)
    linear_weights = sum(
        module.weight.numel()
        for name, module in smollm2.model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    )
    assert smollm2.decoder_linear_params() == linear_weights == 30 * (576 * 64 * (9 + 3) * 2 + 3 * 576 * 1536)
    # fp32 cache: 30 layers x 3 KV heads x (64 + 64) values x 4 bytes
    assert smollm2.kv_bytes_per_token() == 30 * 3 * 128 * 4
    assert smollm2.kv_cache_bits is None  # a full-precision cache is as wide as the model's dtype
