"""Qwen3 adapter (``a3q.arch.qwen3`` + ``modeling_a3q_qwen3``) on a tiny random config: full rank is HF's
Qwen3ForCausalLM bit for bit, kept rows equal the dense model with the other rows zeroed (q/k norms over the kept
coordinates), incremental decoding equals a full forward, and an export loads with remote code alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from a3q.arch import family_of
from a3q.modeling.auto import a3_config_from_dense, a3_model_from_state_dict, save_with_remote_code, to_a3_model
from a3q.modeling.modeling_a3q_qwen3 import A3Qwen3ForCausalLM
from tests.decoding import incremental_logits
from tests.remote_code import remote_code_logits

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


def ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, use_cache=False).logits


@pytest.mark.parametrize("bias", [False, True])
def test_full_rank_conversion_is_bit_identical(bias: bool):
    dense = tiny_qwen3(bias=bias)
    a3 = to_a3_model(dense)
    assert family_of(dense.config) == "qwen3" and type(a3) is A3Qwen3ForCausalLM
    assert torch.equal(logits(a3, ids()), logits(dense, ids()))


def compressed_and_zeroed(r_qk: int = 8, r_vo: int = 10, r_ff: int = 20, bias: bool = True):
    """A compressed model from kept rows, and the dense model with every other row zeroed.

    The compressed q/k norm divides by ``sqrt(‖u_S‖²/r)``, the zeroed dense one by ``sqrt(‖u_S‖²/d)``, so the dense
    gain on kept coordinates is the compressed gain times ``sqrt(r/d)`` (ε ≈ 0 here).
    """
    dense = tiny_qwen3(eps=1e-30, bias=bias)
    gen = torch.Generator().manual_seed(3)
    pairs = [sorted(torch.randperm(D // 2, generator=gen)[: r_qk // 2].tolist()) for _ in range(L)]
    vo = [torch.randperm(D, generator=gen)[:r_vo].sort().values for _ in range(L)]
    ff = [torch.randperm(FF, generator=gen)[:r_ff].sort().values for _ in range(L)]
    state, zeroed = {k: v.clone() for k, v in dense.state_dict().items()}, copy.deepcopy(dense)
    for layer, block in enumerate(zeroed.model.layers):
        coords = torch.tensor(pairs[layer] + [p + D // 2 for p in pairs[layer]])
        keep = {"q_proj": torch.cat([h * D + coords for h in range(H)]),
                "k_proj": torch.cat([kv * D + coords for kv in range(H_KV)]),
                "v_proj": torch.cat([kv * D + vo[layer] for kv in range(H_KV)])}
        attn, mlp = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
        with torch.no_grad():
            for name, rows in keep.items():
                for kind in ("weight", "bias"):
                    if attn + f"{name}.{kind}" in state:
                        state[attn + f"{name}.{kind}"] = state[attn + f"{name}.{kind}"][rows]
                        mask = torch.ones_like(getattr(getattr(block.self_attn, name), kind), dtype=torch.bool)
                        mask[rows] = False
                        getattr(getattr(block.self_attn, name), kind)[mask] = 0.0
            cols_o = torch.cat([h * D + vo[layer] for h in range(H)])
            state[attn + "o_proj.weight"] = state[attn + "o_proj.weight"][:, cols_o]
            mask = torch.ones(H * D, dtype=torch.bool)
            mask[cols_o] = False
            block.self_attn.o_proj.weight[:, mask] = 0.0
            for name in ("q_norm", "k_norm"):
                state[f"{attn}{name}.weight"] = state[f"{attn}{name}.weight"][coords]
                getattr(block.self_attn, name).weight[coords] *= math.sqrt(r_qk / D)
            for name in ("gate_proj", "up_proj"):
                state[f"{mlp}{name}.weight"] = state[f"{mlp}{name}.weight"][ff[layer]]
            state[f"{mlp}down_proj.weight"] = state[f"{mlp}down_proj.weight"][:, ff[layer]]
            mask = torch.ones(FF, dtype=torch.bool)
            mask[ff[layer]] = False
            block.mlp.gate_proj.weight[mask] = 0.0
            block.mlp.up_proj.weight[mask] = 0.0
            block.mlp.down_proj.weight[:, mask] = 0.0
    config = a3_config_from_dense(dense.config, qk_head_dims=[r_qk] * L, vo_head_dims=[r_vo] * L,
                                  intermediate_sizes=[r_ff] * L, rope_pairs=[[p] * H_KV for p in pairs])
    if dense.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return a3_model_from_state_dict(config, state), zeroed


def test_kept_rows_equal_zeroed_dense():
    compressed, zeroed = compressed_and_zeroed()
    assert compressed.model.layers[0].self_attn.q_norm.weight.shape == (8,)
    torch.testing.assert_close(logits(compressed, ids()), logits(zeroed, ids()), rtol=1e-4, atol=1e-5)


def test_incremental_decoding_equals_full_forward():
    model, _ = compressed_and_zeroed()
    x = ids(seq=12)
    full = logits(model, x)
    torch.testing.assert_close(incremental_logits(model, x, prefix=5), full, rtol=1e-4, atol=1e-5)


def test_export_loads_with_remote_code_alone(tmp_path):
    model, _ = compressed_and_zeroed()
    x = ids(seq=10)
    save_with_remote_code(model, tmp_path / "export")
    assert (tmp_path / "export" / "modeling_a3q_qwen3.py").is_file()
    assert torch.equal(remote_code_logits(tmp_path / "export", x, "A3Qwen3ForCausalLM"), logits(model, x))
