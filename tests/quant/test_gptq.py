"""GPTQ against brute force, in float64: the Cholesky/lazy-batch algorithm must make exactly the choices of the
textbook greedy (re-inverting the remaining Hessian after every column), and never beat the exhaustive optimum."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from a3q.quant.gptq import (HessianAccumulator, HessianNotPositiveDefinite, group_parameters, gptq_quantize,
                            processing_order, quantize_columns)
from a3q.quant.gptq_linear import GPTQLinear, unpack_rows


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # GPTQ's column loop is many small ops (two threads on 2 busy cores are slower)


def _problem(seed: int, out_features: int = 6, in_features: int = 20, tokens: int = 400):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=generator, dtype=torch.float64)
    inputs = torch.randn(tokens, in_features, generator=generator, dtype=torch.float64) @ mixing
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    accumulator = HessianAccumulator(in_features)
    accumulator.add(inputs)
    return weight, accumulator.hessian()


def _visit_order(diagonal, group, ordering):
    """Processing order and each position's group, written out naively (independent of gptq.processing_order)."""
    n = diagonal.shape[0]
    if ordering == "act_order":
        order = sorted(range(n), key=lambda i: -float(diagonal[i]))
        return order, [p // group for p in range(n)]
    if ordering == "aga":
        members = [list(range(start, min(start + group, n))) for start in range(0, n, group)]
        visit = sorted(range(len(members)), key=lambda g: -max(float(diagonal[i]) for i in members[g]))
        order, groups = [], []
        for g in visit:
            inside = sorted(members[g], key=lambda i: -float(diagonal[i]))
            order += inside
            groups += [g] * len(inside)
        return order, groups
    return list(range(n)), [p // group for p in range(n)]


def _greedy_reference(weight, hessian, bits, group_size, sym, ordering, damp_percent):
    """Optimal Brain Quantization's greedy, written the slow way: after each column, invert the Hessian of the
    columns still free and spread the rounding error over them. A group's parameters come from its members'
    current values when its first member is visited."""
    in_features = weight.shape[1]
    group = group_size if group_size > 0 else in_features
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = torch.diag(H)[~dead].mean()
    order, groups = _visit_order(torch.diag(H), group, ordering if group_size > 0 or ordering == "act_order" else "plain")
    order = torch.tensor(order)
    W, H = weight.clone()[:, order], H[order][:, order]
    W[:, dead[order]] = 0
    H = H + damp_percent * torch.mean(torch.diag(H)) * torch.eye(in_features, dtype=H.dtype)
    codes = torch.zeros_like(W)
    if group_size <= 0:
        scale, zero = group_parameters(W, bits, sym)
    for column in range(in_features):
        if group_size > 0 and (column == 0 or groups[column] != groups[column - 1]):
            members = [p for p in range(column, in_features) if groups[p] == groups[column]]
            scale, zero = group_parameters(W[:, members], bits, sym)
        code, value = quantize_columns(W[:, column : column + 1], scale, zero, bits)
        codes[:, column] = code[:, 0]
        free = torch.arange(column, in_features)
        inverse = torch.linalg.inv(H[free][:, free])
        error = (W[:, column] - value[:, 0]) / inverse[0, 0]
        W[:, free] -= error[:, None] * inverse[0][None, :]
        W[:, column] = value[:, 0]
    return codes[:, torch.argsort(order)]


@pytest.mark.parametrize("bits,group_size,sym,ordering", [
    (4, -1, True, "plain"), (4, 8, False, "plain"), (3, 8, True, "act_order"), (2, 6, False, "act_order"),
    (8, 16, True, "plain"),
    # act-group-aware: 20 inputs in groups of 8 and 6 leave partial groups (4, 2) that may be visited first
    (4, 8, True, "aga"), (3, 6, False, "aga"), (2, 6, True, "aga"),
])
def test_gptq_makes_the_greedy_obq_choices(bits, group_size, sym, ordering):
    for seed in range(3):
        weight, hessian = _problem(seed)
        if seed == 2:
            hessian[5, :] = hessian[:, 5] = 0  # a dead input
        fast = gptq_quantize(weight, hessian, bits, group_size, sym, act_order=ordering == "act_order",
                             damp_percent=0.01, block_size=8, act_group_aware=ordering == "aga")
        slow = _greedy_reference(weight, hessian, bits, group_size, sym, ordering, damp_percent=0.01)
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


def _dequantize(result):
    """W[o, i] = scales[g_idx[i], o] · (codes[o, i] − zeros[g_idx[i], o]) in float64."""
    groups = result.g_idx.long()
    return result.scales.double()[groups].t() * (result.codes.double() - result.zeros.double()[groups].t())


def _outlier_problem(seed: int, out_features: int = 8, in_features: int = 32, tokens: int = 300):
    """Inputs whose channels differ in scale by orders of magnitude (log-normal), as LLM activations do, with some
    correlation between channels: the regime act-order and act-group-aware reordering are for."""
    generator = torch.Generator().manual_seed(1000 + seed)
    scales = torch.exp(1.5 * torch.randn(in_features, generator=generator, dtype=torch.float64))
    mixing = torch.eye(in_features, dtype=torch.float64) + 0.3 * torch.randn(in_features, in_features, generator=generator, dtype=torch.float64)
    inputs = (torch.randn(tokens, in_features, generator=generator, dtype=torch.float64) @ mixing) * scales
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    accumulator = HessianAccumulator(in_features)
    accumulator.add(inputs)
    return weight, accumulator.hessian()


def test_act_group_aware_beats_plain_gptq_on_average_and_keeps_the_v1_layout():
    plain_errors, aga_errors, wins = [], [], 0
    for seed in range(24):
        weight, hessian = _outlier_problem(seed)
        plain = gptq_quantize(weight, hessian, bits=3, group_size=8, sym=True)
        aga = gptq_quantize(weight, hessian, bits=3, group_size=8, sym=True, act_group_aware=True)
        # groups are the plain contiguous ranges: an ordinary desc_act=false checkpoint
        assert aga.g_idx.tolist() == [i // 8 for i in range(32)]
        plain_errors.append(_objective(weight, _dequantize(plain), hessian))
        aga_errors.append(_objective(weight, _dequantize(aga), hessian))
        assert aga.relative_error == pytest.approx(aga_errors[-1] / _objective(weight, 0 * weight, hessian), rel=1e-9)
        wins += aga_errors[-1] <= plain_errors[-1]
    assert sum(aga_errors) < 0.9 * sum(plain_errors), (sum(aga_errors) / 24, sum(plain_errors) / 24)
    assert wins >= 18, f"act-group-aware was at least as good as plain GPTQ in only {wins}/24 problems"


def test_act_group_aware_codes_round_trip_through_the_v1_tensors():
    """Stored as GPTQ v1 (qweight packed along inputs, qzeros minus one), the weight must be
    W[i, o] = scales[g_idx[i], o] · (q[i, o] − (qzeros[g_idx[i], o] + 1)), and equal GPTQ's dequantized weight."""
    weight, hessian = _outlier_problem(0, out_features=16, in_features=36)  # 36 = 4 groups of 8 + a partial 4
    result = gptq_quantize(weight.float(), hessian, bits=4, group_size=8, sym=False, act_group_aware=True)
    order, groups = processing_order(torch.diag(hessian), 8, act_group_aware=True)
    assert sorted(order.tolist()) == list(range(36)) and groups[torch.argsort(order)].tolist() == [i // 8 for i in range(36)]
    linear = GPTQLinear(36, 16, bits=4, group_size=8)
    linear.set_codes(result.codes, result.scales, result.zeros, result.g_idx)
    q = unpack_rows(linear.qweight, 4, 36).long()  # [in, out]
    stored_zero = unpack_rows(linear.qzeros.t().contiguous(), 4, 16).t().long()  # [groups, out], zero − 1
    g = linear.g_idx.long()
    rebuilt = linear.scales.double()[g] * (q - (stored_zero[g] + 1))  # [in, out]
    assert torch.equal(linear.g_idx, torch.arange(36, dtype=torch.int32) // 8)
    assert torch.equal(rebuilt.t(), _dequantize(result))
    assert torch.equal(linear.dequantize(torch.float64), _dequantize(result))


def test_relative_error_ignores_dead_inputs_and_the_hessians_scale():
    """Issue 11: 16 inputs that never fire used to count their (irrelevant) weights as error, with weight 1."""
    weight, hessian = _problem(3, out_features=8, in_features=48)
    dead = torch.arange(0, 48, 3)  # 16 dead inputs
    hessian[dead, :] = 0
    hessian[:, dead] = 0
    for scale in (1.0, 1e-3):
        result = gptq_quantize(weight, scale * hessian, bits=4, group_size=16, sym=True)
        q = _dequantize(result)
        assert torch.equal(q[:, dead], torch.zeros(8, 16, dtype=torch.float64))  # dead inputs are quantized to 0
        expected = _objective(weight, q, hessian) / _objective(weight, 0 * weight, hessian)
        assert result.relative_error == pytest.approx(expected, rel=1e-9)
        assert result.relative_error < 0.05
    # and the codes themselves do not depend on the scale
    a = gptq_quantize(weight, hessian, bits=4, group_size=16, sym=True)
    b = gptq_quantize(weight, 1e-3 * hessian, bits=4, group_size=16, sym=True)
    assert torch.equal(a.codes, b.codes) and a.relative_error == pytest.approx(b.relative_error, rel=1e-9)


def test_damp_auto_raises_the_damping_until_cholesky_succeeds():
    weight, hessian = _problem(4)
    eigenvalues, vectors = torch.linalg.eigh(hessian)
    mean = float(torch.diag(hessian).mean())
    eigenvalues[0] = -0.03 * mean  # an indefinite "Hessian" (as round-off on a rank-deficient H can produce)
    indefinite = (vectors * eigenvalues) @ vectors.T
    with pytest.raises(HessianNotPositiveDefinite, match="damp_auto"):
        gptq_quantize(weight, indefinite, bits=4, group_size=8, damp_percent=0.01)
    auto = gptq_quantize(weight, indefinite, bits=4, group_size=8, damp_percent=0.01, damp_auto=True)
    # doubling from 0.01: 0.01 and 0.02 leave the −0.03·mean eigenvalue negative, 0.04 is the first to lift it
    assert auto.damp_percent == 0.04
    fixed = gptq_quantize(weight, indefinite, bits=4, group_size=8, damp_percent=auto.damp_percent)
    assert torch.equal(auto.codes, fixed.codes)
    healthy = gptq_quantize(weight, hessian, bits=4, group_size=8, damp_percent=0.01, damp_auto=True)
    assert healthy.damp_percent == 0.01


def test_act_order_and_act_group_aware_are_exclusive():
    weight, hessian = _problem(0)
    with pytest.raises(ValueError, match="exclusive"):
        gptq_quantize(weight, hessian, bits=4, group_size=8, act_order=True, act_group_aware=True)


def test_non_finite_inputs_give_a_nan_error_not_a_small_one():
    weight, hessian = _problem(0)
    weight[0, 3] = float("nan")
    result = gptq_quantize(weight, hessian, bits=4, group_size=8)
    assert math.isnan(result.relative_error)


def test_the_hessian_does_not_depend_on_how_windows_are_batched():
    """One batch of 4 float32 windows vs two batches of 2 (what one process and each of two processes see at
    batch size 4): the Hessians must agree to float64 rounding. Float32 batch products differed by ~1e-7, enough
    for GPTQ's error feedback to flip codes and the flips to cascade through later layers (issue 13)."""
    generator = torch.Generator().manual_seed(3)
    scales = torch.exp(2.0 * torch.randn(96, generator=generator))  # channels of very different size, as in LLMs
    windows = torch.randn(4, 128, 96, generator=generator) * scales  # float32, as a layer's inputs are

    def accumulate(batch_size: int) -> HessianAccumulator:
        accumulator = HessianAccumulator(96)
        for start in range(0, 4, batch_size):
            accumulator.add(windows[start : start + batch_size])
        return accumulator

    one, two = accumulate(4), accumulate(2)
    assert one.tokens == two.tokens == 4 * 128
    flat = windows.reshape(-1, 96).double()
    exact = 2 * flat.t() @ flat / flat.shape[0]
    for hessian in (one.hessian(), two.hessian()):
        assert hessian.dtype == torch.float64
        assert float((hessian - exact).norm() / exact.norm()) < 1e-13
    weight = torch.randn(32, 96, generator=generator)
    codes = [gptq_quantize(weight, acc.hessian(), bits=4, group_size=32).codes for acc in (one, two)]
    assert torch.equal(*codes)
