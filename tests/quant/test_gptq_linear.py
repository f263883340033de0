"""GPTQ v1 storage: the bit layout external loaders expect, exact round trips, and the bytes formula."""

from __future__ import annotations

import pytest
import torch

from a3q.module_types import weight_bytes
from a3q.quant.gptq_linear import GPTQLinear, pack_rows, unpack_rows


def _autogptq_pack_3bit(codes: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's 3-bit packing loop, transcribed: 32 codes into 3 words, values straddling word edges."""
    intweight = codes.to(torch.int64)
    rows = intweight.shape[0] // 32 * 3
    qweight = torch.zeros(rows, intweight.shape[1], dtype=torch.int64)
    i = row = 0
    while row < rows:
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i))
        i += 10
        qweight[row] |= intweight[i] << 30
        row += 1
        qweight[row] |= (intweight[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i) + 1)
        i += 10
        qweight[row] |= intweight[i] << 31
        row += 1
        qweight[row] |= (intweight[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    qweight &= 0xFFFFFFFF
    return torch.where(qweight >= 2**31, qweight - 2**32, qweight).to(torch.int32)


def _reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The 2/4/8-bit v1 loop: code i at bit (i mod 32/b)·b of word i·b/32."""
    per_word = 32 // bits
    words = torch.zeros(codes.shape[0] // per_word, codes.shape[1], dtype=torch.int64)
    for i in range(codes.shape[0]):
        words[i // per_word] |= codes[i].to(torch.int64) << (bits * (i % per_word))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_the_reference_layout_and_round_trips(bits):
    codes = torch.randint(0, 2**bits, (64, 7), generator=torch.Generator().manual_seed(bits))
    packed = pack_rows(codes, bits)
    expected = _autogptq_pack_3bit(codes) if bits == 3 else _reference_pack(codes, bits)
    assert torch.equal(packed, expected)
    for rows in (1, 13, 45, 64):  # shapes that do not fill whole words are padded with zero codes
        assert torch.equal(unpack_rows(pack_rows(codes[:rows], bits), bits, rows), codes[:rows].int())


@pytest.mark.parametrize("bits,group_size,in_features", [(4, 8, 40), (4, 16, 45), (3, 8, 45), (8, -1, 19), (2, 32, 70)])
def test_linear_stores_v1_tensors_and_dequantizes_exactly(bits, group_size, in_features):
    generator = torch.Generator().manual_seed(0)
    out_features = 12
    linear = GPTQLinear(in_features, out_features, bits, group_size, bias=True)
    groups = -(-in_features // linear.group_size)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=generator)
    zeros = torch.randint(1, 2**bits, (groups, out_features), generator=generator)
    scales = torch.rand(groups, out_features, generator=generator).half()
    g_idx = torch.arange(in_features) // linear.group_size
    linear.set_codes(codes, scales, zeros, g_idx)
    state = linear.state_dict()
    assert state["qweight"].dtype == torch.int32 and state["qweight"].shape == (-(-in_features * bits // 32), out_features)
    assert state["qzeros"].shape == (groups, -(-out_features * bits // 32))
    assert state["scales"].dtype == torch.float16 and state["g_idx"].dtype == torch.int32
    # W[o, i] = scales[g, o] · (q[i, o] − (stored_zero[g, o] + 1)), g = g_idx[i]
    stored_zero = unpack_rows(state["qzeros"].t().contiguous(), bits, out_features).t()
    assert torch.equal(stored_zero + 1, zeros.int())
    expected = scales.float()[g_idx].t() * (codes.float() - zeros.float()[g_idx].t())
    assert torch.equal(linear.dequantize(torch.float32), expected)
    x = torch.randn(3, in_features)
    assert torch.allclose(linear(x), x @ expected.t() + linear.bias, atol=1e-5)
    stored = sum(state[k].numel() * state[k].element_size() for k in ("qweight", "qzeros", "scales", "g_idx"))
    assert weight_bytes({"method": "gptq", "bits": bits, "group_size": linear.group_size}, in_features, out_features) == stored


def test_zero_point_below_one_is_refused():
    linear = GPTQLinear(8, 8, 4, 8)
    with pytest.raises(ValueError, match="at least 1"):
        linear.set_codes(torch.zeros(8, 8), torch.ones(1, 8), torch.zeros(1, 8), torch.zeros(8))
