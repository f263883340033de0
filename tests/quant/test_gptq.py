"""GPTQ against brute force, in float64: the Cholesky/lazy-batch algorithm must make exactly the choices of the
textbook greedy (re-inverting the remaining Hessian after every column), and never beat the exhaustive optimum."""

from __future__ import annotations

import itertools

import pytest
import torch

from a3q.quant.gptq import HessianAccumulator, group_parameters, gptq_quantize, quantize_columns


def _problem(seed: int, out_features: int = 6, in_features: int = 20, tokens: int = 400):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=generator, dtype=torch.float64)
    inputs = torch.randn(tokens, in_features, generator=generator, dtype=torch.float64) @ mixing
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    accumulator = HessianAccumulator(in_features)
    accumulator.add(inputs)
    return weight, accumulator.hessian()


def _greedy_reference(weight, hessian, bits, group_size, sym, act_order, damp_percent):
    """Optimal Brain Quantization's greedy, written the slow way: after each column, invert the Hessian of the
    columns still free and spread the rounding error over them."""
    in_features = weight.shape[1]
    group = group_size if group_size > 0 else in_features
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_features)
    W, H = weight.clone()[:, order], H[order][:, order]
    H = H + damp_percent * torch.mean(torch.diag(H)) * torch.eye(in_features, dtype=H.dtype)
    codes = torch.zeros_like(W)
    if group_size <= 0:
        scale, zero = group_parameters(W, bits, sym)
    for column in range(in_features):
        if group_size > 0 and column % group == 0:
            scale, zero = group_parameters(W[:, column : column + group], bits, sym)
        code, value = quantize_columns(W[:, column : column + 1], scale, zero, bits)
        codes[:, column] = code[:, 0]
        free = torch.arange(column, in_features)
        inverse = torch.linalg.inv(H[free][:, free])
        error = (W[:, column] - value[:, 0]) / inverse[0, 0]
        W[:, free] -= error[:, None] * inverse[0][None, :]
        W[:, column] = value[:, 0]
    return codes[:, torch.argsort(order)]


@pytest.mark.parametrize("bits,group_size,sym,act_order", [
    (4, -1, True, False), (4, 8, False, False), (3, 8, True, True), (2, 6, False, True), (8, 16, True, False),
])
def test_gptq_makes_the_greedy_obq_choices(bits, group_size, sym, act_order):
    for seed in range(3):
        weight, hessian = _problem(seed)
        fast = gptq_quantize(weight, hessian, bits, group_size, sym, act_order, damp_percent=0.01, block_size=8)
        slow = _greedy_reference(weight, hessian, bits, group_size, sym, act_order, damp_percent=0.01)
        assert torch.equal(fast.codes.double(), slow)


def test_diagonal_hessian_reduces_to_round_to_nearest():
    weight, _ = _problem(0)
    hessian = torch.diag(torch.rand(20, dtype=torch.float64) + 0.5)
    result = gptq_quantize(weight, hessian, bits=3, group_size=5, sym=False)
    for start in range(0, 20, 5):
        scale, zero = group_parameters(weight[:, start : start + 5], 3, sym=False)
        codes, _ = quantize_columns(weight[:, start : start + 5], scale, zero, 3)
        assert torch.equal(result.codes[:, start : start + 5].double(), codes)


def _objective(weight, dequantized, hessian):
    difference = weight - dequantized
    return float(torch.einsum("oi,ij,oj->", difference, hessian, difference))


def test_never_better_than_exhaustive_search_and_beats_rounding_on_average():
    """One output row, 2 bits, 6 inputs: all 4⁶ code vectors on GPTQ's grid searched exhaustively."""
    gaps, rounding_gaps, wins = [], [], 0
    for seed in range(20):
        weight, hessian = _problem(seed, out_features=1, in_features=6)
        result = gptq_quantize(weight, hessian, bits=2, group_size=-1, sym=False, damp_percent=1e-9)
        scale, zero = result.scales.double()[0], result.zeros.double()[0]
        dequantize = lambda codes: scale * (codes - zero)  # noqa: E731
        grid = torch.tensor(list(itertools.product(range(4), repeat=6)), dtype=torch.float64)
        values = dequantize(grid)
        differences = weight - values
        best = torch.einsum("ni,ij,nj->n", differences, hessian, differences).min().item()
        gptq = _objective(weight, dequantize(result.codes.double()), hessian)
        rounded = _objective(weight, quantize_columns(weight, scale, zero, 2)[1], hessian)
        assert gptq >= best - 1e-9
        gaps.append(gptq / best)
        rounding_gaps.append(rounded / best)
        wins += gptq <= rounded + 1e-12
    assert wins >= 15, f"GPTQ beat round-to-nearest in only {wins}/20 problems"
    assert sum(gaps) < 0.75 * sum(rounding_gaps), (sum(gaps) / 20, sum(rounding_gaps) / 20)


def test_relative_error_is_the_objective():
    weight, hessian = _problem(1)
    result = gptq_quantize(weight, hessian, bits=4, group_size=8, sym=True)
    scales = result.scales.double()[result.g_idx.long()].t()
    zeros = result.zeros.double()[result.g_idx.long()].t()
    dequantized = scales * (result.codes.double() - zeros)
    expected = _objective(weight, dequantized, hessian) / _objective(weight, torch.zeros_like(weight), hessian)
    assert result.relative_error == pytest.approx(expected, rel=1e-9)
    assert int(result.zeros.min()) >= 1  # the v1 layout stores zero − 1


def test_dead_inputs_and_partial_last_group():
    weight, hessian = _problem(2, in_features=19)
    hessian[4, :] = hessian[:, 4] = 0  # an input that is always zero
    result = gptq_quantize(weight, hessian, bits=4, group_size=8, sym=False)
    assert result.scales.shape == (3, 6)  # 8 + 8 + 3 inputs
    assert result.g_idx.tolist() == [i // 8 for i in range(19)]
    assert torch.isfinite(result.scales.float()).all()
