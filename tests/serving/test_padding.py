"""Zero padding to the head sizes vLLM's CPU attention runs is exact, in transformers/torch as in vLLM.

The generation tests prove the padded vLLM model equals transformers' unpadded one end to end; here the padding
itself is checked in isolation, with a3q's transformers class: the real SmolLM2 A³ artifact against the same model
with every head padded as the plugin pads it (``a3q.serving.padding.pad_heads``: zero q/k rows, zero v rows, zero
o_proj columns; RoPE on the kept coordinates only). The padded coordinates are exactly zero, and the logits agree to
float32 rounding (only GEMM shapes change, hence summation blocking).
"""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from a3q.serving.padding import BACKENDS, kv_bytes_per_token, pad_heads, padded_sizes, padding_plan
from tests.serving.helpers import CACHE


def test_pad_heads_keeps_every_entry_and_adds_zeros():
    torch.manual_seed(0)
    weight = torch.randn(3 * 50, 7)
    padded = pad_heads(weight, 3, 50, 64, dim=0)
    assert padded.shape == (3 * 64, 7)
    blocks = padded.view(3, 64, 7)
    assert torch.equal(blocks[:, :50], weight.view(3, 50, 7)) and not blocks[:, 50:].any()
    columns = torch.randn(5, 9 * 51)
    padded = pad_heads(columns, 9, 51, 64, dim=1)
    assert torch.equal(padded.view(5, 9, 64)[..., :51], columns.view(5, 9, 51)) and not padded.view(5, 9, 64)[..., 51:].any()
    bias = torch.randn(3 * 50)
    assert torch.equal(pad_heads(bias, 3, 50, 64).view(3, 64)[:, :50], bias.view(3, 50))
    assert pad_heads(weight, 3, 50, 50) is weight


def test_head_size_rule_is_vllm_cpus():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert list(BACKENDS["cpu"].sizes) == CPUAttentionBackend.get_supported_head_sizes()
    assert padded_sizes(50, 51, BACKENDS["cpu"]) == (64, 64)  # one size for K and V (one cache tensor)
    assert padded_sizes(32, 32, BACKENDS["cpu"]) == (32, 32)
    assert padded_sizes(230, 230, BACKENDS["cpu"]) == (256, 256)
    assert padded_sizes(100, 60, BACKENDS["flash"]) == (104, 104)
    config = types.SimpleNamespace(num_hidden_layers=2, head_dim=64, qk_head_dims=[50, 32], vo_head_dims=[51, 32])
    plan = padding_plan(config, BACKENDS["cpu"])
    assert [(p.p_qk, p.p_v) for p in plan] == [(64, 64), (32, 32)]
    assert kv_bytes_per_token(plan, 3, 4) == (3 * (101 + 64) * 4, 3 * (128 + 64) * 4)


def _pad_model(model) -> list:
    """Pad every attention of an a3q Llama-family transformers model as the vLLM plugin does; returns the padded
    q/k/v projections (to check their extra outputs are zero)."""
    projections = []
    for attn in (layer.self_attn for layer in model.model.layers):
        h, h_kv, r_qk, r_vo = attn.num_heads, attn.num_key_value_heads, attn.qk_head_dim, attn.vo_head_dim
        p_qk, p_v = padded_sizes(r_qk, r_vo, BACKENDS["cpu"])

        def padded_linear(old: nn.Linear, heads: int, size: int, padded: int, dim: int) -> nn.Linear:
            weight = pad_heads(old.weight.data, heads, size, padded, dim)
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=old.bias is not None)
            new.weight.data = weight
            if old.bias is not None:  # q/k/v biases pad like their rows; o_proj's bias is per output, unchanged
                new.bias.data = pad_heads(old.bias.data, heads, size, padded) if dim == 0 else old.bias.data.clone()
            return new

        attn.q_proj = padded_linear(attn.q_proj, h, r_qk, p_qk, 0)
        attn.k_proj = padded_linear(attn.k_proj, h_kv, r_qk, p_qk, 0)
        attn.v_proj = padded_linear(attn.v_proj, h_kv, r_vo, p_v, 0)
        attn.o_proj = padded_linear(attn.o_proj, h, r_vo, p_v, 1)
        projections.append((attn.q_proj, h, r_qk, p_qk))
        projections.append((attn.k_proj, h_kv, r_qk, p_qk))
        projections.append((attn.v_proj, h_kv, r_vo, p_v))
        rope = attn._apply_rope

        def padded_rope(q, k, cos, sin, rope=rope, r=r_qk, p=p_qk):
            q, k = rope(q[..., :r], k[..., :r], cos, sin)  # the kept pairs, as before; then the zero coordinates
            return F.pad(q, (0, p - r)), F.pad(k, (0, p - r))

        attn._apply_rope = padded_rope
        attn.qk_head_dim, attn.vo_head_dim = p_qk, p_v
    return projections


def test_padded_logits_equal_unpadded(artifacts):
    from a3q.modeling.modeling_a3q_llama import A3LlamaForCausalLM

    folder = artifacts["smollm2-a3-20"]
    torch.manual_seed(0)
    model = A3LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    articles = json.loads((CACHE / "corpora" / "enwiki-v1.json").read_text())
    from transformers import AutoTokenizer

    text = articles[4]["text"][:1500]
    ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        reference = model(ids).logits
        projections = _pad_model(model)
        zeros = []
        hooks = [proj.register_forward_hook(
            lambda mod, inp, out, h=h, r=r, p=p: zeros.append(out.view(*out.shape[:-1], h, p)[..., r:].abs().max()))
            for proj, h, r, p in projections if p > r]
        padded = model(ids).logits
        for hook in hooks:
            hook.remove()
    assert hooks, "this artifact's heads are padded on CPU"
    assert max(zeros).item() == 0.0  # padded q/k/v coordinates are exactly zero
    deviation = (padded - reference).abs().max().item()
    assert deviation <= 1e-5 * reference.abs().max().item(), deviation  # measured 1.7e-6 relative (6.9e-5 of 41)
    assert torch.equal(padded.argmax(-1), reference.argmax(-1))
    print(f"padded vs unpadded logits: max |diff| {deviation:.2e} (max |logit| {reference.abs().max().item():.1f})")
