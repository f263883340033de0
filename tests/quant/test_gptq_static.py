"""Static activation order (issue 32) against brute force in float64, and the faster Hessian against the plain one.

``act_order: "static"``: columns visited by decreasing ``diag H``; groups are the contiguous input ranges with scale
and zero fixed from the original weights before GPTQ; the checkpoint is a plain desc_act = false GPTQ v1 one.
"""

from __future__ import annotations

import pytest
import torch

from a3q.quant.gptq import HessianAccumulator, group_parameters, gptq_quantize, processing_order, quantize_columns
from a3q.quant.gptq_linear import GPTQLinear, unpack_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _outliers(seed: int, out_features: int = 8, in_features: int = 20, tokens: int = 300):
    """Correlated inputs whose channels differ in scale by orders of magnitude, as LLM activations do."""
    generator = torch.Generator().manual_seed(500 + seed)
    scales = torch.exp(1.5 * torch.randn(in_features, generator=generator, dtype=torch.float64))
    mixing = torch.eye(in_features, dtype=torch.float64) + 0.3 * torch.randn(in_features, in_features,
                                                                             generator=generator, dtype=torch.float64)
    inputs = (torch.randn(tokens, in_features, generator=generator, dtype=torch.float64) @ mixing) * scales
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    accumulator = HessianAccumulator(in_features)
    accumulator.add(inputs)
    return weight, accumulator.hessian()


def _static_reference(weight, hessian, bits, group_size, sym, damp_percent):
    """Optimal Brain Quantization's greedy the slow way (re-inverting the free columns' Hessian after every column),
    visiting columns by decreasing diag H, each quantized with its contiguous group's parameters taken from the
    original weight."""
    n = weight.shape[1]
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = torch.diag(H)[~dead].mean()
    W = weight.clone()
    W[:, dead] = 0
    params = [group_parameters(W[:, start : start + group_size], bits, sym) for start in range(0, n, group_size)]
    order = sorted(range(n), key=lambda i: -float(torch.diag(H)[i]))
    H = H + damp_percent * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype)
    codes = torch.zeros_like(W)
    free = list(order)
    while free:
        column = free[0]
        scale, zero = params[column // group_size]
        code, value = quantize_columns(W[:, column : column + 1], scale, zero, bits)
        codes[:, column] = code[:, 0]
        inverse = torch.linalg.inv(H[free][:, free])
        error = (W[:, column] - value[:, 0]) / inverse[0, 0]
        W[:, free] -= error[:, None] * inverse[0][None, :]
        W[:, column] = value[:, 0]
        free = free[1:]
    return codes


@pytest.mark.parametrize("bits,group_size,sym", [(4, 8, True), (3, 6, False), (2, 8, False), (4, 7, True)])
def test_static_act_order_makes_the_greedy_obq_choices(bits, group_size, sym):
    for seed in range(3):
        weight, hessian = _outliers(seed)
        if seed == 2:
            hessian[5, :] = hessian[:, 5] = 0  # a dead input
        fast = gptq_quantize(weight, hessian, bits, group_size, sym, act_order="static", damp_percent=0.01,
                             block_size=5)
        slow = _static_reference(weight, hessian, bits, group_size, sym, damp_percent=0.01)
        assert torch.equal(fast.codes.double(), slow)
        assert fast.g_idx.tolist() == [i // group_size for i in range(20)]  # plain contiguous groups


def test_static_groups_have_the_original_weights_parameters_and_the_v1_layout_round_trips():
    weight, hessian = _outliers(3, out_features=16, in_features=36)  # 4 groups of 8 + a partial 4
    result = gptq_quantize(weight.float(), hessian, bits=4, group_size=8, sym=False, act_order="static")
    for g, start in enumerate(range(0, 36, 8)):
        scale, zero = group_parameters(weight.float()[:, start : start + 8], 4, sym=False)
        assert torch.equal(result.scales[g], scale.half()) and torch.equal(result.zeros[g], zero.int())
    linear = GPTQLinear(36, 16, bits=4, group_size=8)
    linear.set_codes(result.codes, result.scales, result.zeros, result.g_idx)
    q = unpack_rows(linear.qweight, 4, 36).long()
    stored_zero = unpack_rows(linear.qzeros.t().contiguous(), 4, 16).t().long()
    g = torch.arange(36) // 8  # what a desc_act = false loader (GPTQModel, vLLM) assumes
    rebuilt = linear.scales.double()[g] * (q - (stored_zero[g] + 1))
    assert torch.equal(linear.g_idx, g.int())
    assert torch.equal(rebuilt.t(), linear.dequantize(torch.float64))


def test_static_order_is_desc_act_order_with_contiguous_groups():
    diagonal = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0, 6.0])
    order, groups = processing_order(diagonal, 4, act_order="static")
    assert order.tolist() == [5, 1, 3, 2, 4, 0] and groups.tolist() == [1, 0, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="act_order"):
        processing_order(diagonal, 4, act_order="Static")
    with pytest.raises(ValueError, match="exclusive"):
        gptq_quantize(torch.randn(2, 6), torch.eye(6), 4, 4, act_order="static", act_group_aware=True)


def test_static_beats_plain_gptq_on_outlier_inputs_on_average():
    plain, static = 0.0, 0.0
    for seed in range(12):
        weight, hessian = _outliers(seed, in_features=32)
        plain += gptq_quantize(weight, hessian, bits=3, group_size=8, sym=True).relative_error
        static += gptq_quantize(weight, hessian, bits=3, group_size=8, sym=True, act_order="static").relative_error
    assert static < plain, (static, plain)


@pytest.mark.parametrize("in_features", [16, 300, 600])
def test_block_upper_hessian_equals_the_full_product(in_features):
    """The accumulator computes only the blocks on and above the diagonal and mirrors them: the result must be the
    symmetric full product ``2 XᵀX / tokens`` to float64 rounding, whatever the blocks' sizes against the width."""
    generator = torch.Generator().manual_seed(in_features)
    batches = [torch.randn(2, 64, in_features, generator=generator) * torch.exp(torch.randn(in_features, generator=generator))
               for _ in range(3)]
    accumulator = HessianAccumulator(in_features)
    for batch in batches:
        accumulator.add(batch)
    flat = torch.cat(batches).reshape(-1, in_features).double()
    full = 2 * flat.t() @ flat / flat.shape[0]
    hessian = accumulator.hessian()
    assert torch.equal(hessian, hessian.t())
    assert float((hessian - full).abs().max() / full.abs().max()) < 1e-14
    assert torch.equal(accumulator.take_hessian(), hessian)


def test_mse_scales_never_round_trip_worse_than_min_max_and_gptq_follows_the_greedy():
    from a3q.quant.gptq_grid import NORM

    generator = torch.Generator().manual_seed(9)
    columns = torch.randn(32, 16, generator=generator, dtype=torch.float64)
    columns[:, 3] *= 6  # an outlier per row stretches min/max
    for bits, sym in ((4, True), (3, False)):
        plain, searched = group_parameters(columns, bits, sym), group_parameters(columns, bits, sym, mse=True)
        error = [(columns - quantize_columns(columns, *params, bits)[1]).abs().pow(NORM).sum(1) for params in (plain, searched)]
        assert bool((error[1] <= error[0]).all()) and bool((error[1] < error[0]).any())
    # with the searched grid, GPTQ still makes the greedy's choices (same reference as static, searched parameters)
    weight, hessian = _outliers(4)
    fast = gptq_quantize(weight, hessian, 4, 8, True, act_order="static", damp_percent=0.01, mse=True)
    plain = gptq_quantize(weight, hessian, 4, 8, True, act_order="static", damp_percent=0.01)
    assert not torch.equal(fast.scales, plain.scales)
    import a3q.quant.gptq_grid as grid
    original = grid.group_parameters
    try:  # the slow reference with the searched parameters
        globals()["group_parameters"] = lambda c, b, s: original(c, b, s, mse=True)
        slow = _static_reference(weight, hessian, 4, 8, True, damp_percent=0.01)
    finally:
        globals()["group_parameters"] = original
    assert torch.equal(fast.codes.double(), slow)
