"""The proxy's new estimates against brute force: the output Fisher, its KL estimate, GPTQ on sampled rows, and
A³ probes moved between ratios."""

from __future__ import annotations

import pytest
import torch

from a3q.arch import describe, layer_linears
from a3q.arch.surgery import as_a3_graph
from a3q.pipeline.runner import LayerProbe
from a3q.quant.gptq import gptq_quantize
from a3q.search.candidate import Candidate
from a3q.search.fisher import fisher_kl, output_fisher
from a3q.search.probes import a3_curves
from a3q.search.proxy import collect_proxy_statistics, rescaled
from a3q.search.statistics import collect_dense_statistics
from a3q.search.weight_error import quantization_error
from a3q.stages.a3.allocation import plan_global_ranks
from a3q.stages.a3.ranks import plan_ranks
from tests.stages.a3.test_pipeline_tiny import tiny_llama, tokens


def float64_graph():
    return describe(tiny_llama(kv_heads=2).double(), tokenizer=None, source="tiny")


def test_output_fisher_equals_autograd_of_the_sampled_log_likelihood():
    graph = float64_graph()
    windows = tokens(count=4)
    dense = collect_dense_statistics(graph, windows, progress=False)
    fisher = output_fisher(graph, windows, dense.groups, seed=3, batch_size=4)
    outputs = {}
    hooks = [layer_linears(graph.model, "llama", 1)[short].register_forward_hook(
        lambda m, a, out, short=short: outputs.__setitem__(short, out)) for short in ("gate", "up", "down")]
    logits = graph.model(input_ids=windows).logits
    for hook in hooks:
        hook.remove()
    probabilities = torch.softmax(logits.detach().double(), -1).reshape(-1, logits.shape[-1])
    labels = torch.multinomial(probabilities, 1, generator=torch.Generator().manual_seed(3))
    total = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), -1).gather(1, labels).sum()
    gate, up, down = torch.autograd.grad(total, [outputs["gate"], outputs["up"], outputs["down"]])
    expected = {"gate+up": torch.cat([gate.square().reshape(-1, gate.shape[-1]).mean(0),
                                      up.square().reshape(-1, up.shape[-1]).mean(0)]),
                "down": down.square().reshape(-1, down.shape[-1]).mean(0)}
    for key, value in expected.items():
        torch.testing.assert_close(fisher[1][key], value.double(), rtol=1e-6, atol=0)
    assert all(p.requires_grad for p in graph.model.parameters())  # the model is left as it was


def test_fisher_kl_is_the_weighted_sum_brute_force():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    changed = weight + 0.1 * torch.randn(6, 5, generator=generator, dtype=torch.float64)
    x = torch.randn(40, 5, generator=generator, dtype=torch.float64)
    fisher = torch.rand(6, generator=generator, dtype=torch.float64)
    brute = 0.5 * sum(float(fisher[j]) * float(((x @ (weight - changed)[j]) ** 2).mean()) for j in range(6))
    assert fisher_kl(fisher, weight, changed, 2 * x.T @ x / 40) == pytest.approx(brute, rel=1e-12)


def test_fisher_estimate_is_near_the_measured_kl_for_a_small_perturbation():
    """Second order, diagonal: not exact, but the right size (the search rescales it by one probe anyway)."""
    graph = float64_graph()
    windows = tokens(count=6, length=24)
    dense = collect_dense_statistics(graph, windows, progress=False)
    fisher = output_fisher(graph, windows, dense.groups, batch_size=6)
    down = layer_linears(graph.model, "llama", 0)["down"]
    original = down.weight.detach().clone()
    changed = original + 0.02 * original.std() * torch.randn(original.shape, generator=torch.Generator().manual_seed(1),
                                                             dtype=torch.float64)
    estimate = fisher_kl(fisher[0]["down"], original, changed, dense.hessians[0]["down"])

    def swap():
        with torch.no_grad():
            down.weight.copy_(changed)
        return lambda: down.weight.data.copy_(original)

    measured = LayerProbe(graph, windows).kl_after_change(0, swap)
    assert 0.3 < estimate / measured < 3, (estimate, measured)


@pytest.mark.parametrize("act_group_aware", [True, False])
def test_gptq_on_sampled_rows_gives_those_rows_codes(act_group_aware):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 48, generator=generator) * torch.linspace(0.2, 2, 48)
    weight = torch.randn(20, 48, generator=generator)
    hessian = 2 * x.T.double() @ x.double() / 300
    full = gptq_quantize(weight, hessian, 3, 16, act_group_aware=act_group_aware)
    rows = gptq_quantize(weight[::4], hessian, 3, 16, act_group_aware=act_group_aware)
    assert torch.equal(full.codes[::4], rows.codes) and torch.equal(full.scales[:, ::4], rows.scales)


def test_gptq_error_from_sampled_rows_estimates_the_full_error_despite_outlier_rows():
    """Rows with most of the output energy (residual-stream outliers) are always counted exactly; a plain ratio over
    every 4th row, missing the outlier, is 1.8× the full error here."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 64, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 2, 64, dtype=torch.float64)
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weight[50] = 40 * torch.sign(weight[50])  # an outlier row: most of the energy, two levels (a small relative error)
    hessian = 2 * x.T @ x / 400
    fields = (("bits", 3), ("group_size", 16), ("stage", "gptq"))
    full = quantization_error(weight, hessian, fields)
    assert quantization_error(weight, hessian, fields, row_stride=1) == full
    assert quantization_error(weight, hessian, fields, row_stride=4) == pytest.approx(full, rel=0.05)
    naive = quantization_error(weight[1::4], hessian, fields)  # a plain ratio over rows that miss the outliers
    assert abs(naive / full - 1) > 0.5


def test_rescaled_probes_give_the_allocator_the_curves_of_the_original_probes():
    graph = as_a3_graph(describe(tiny_llama(kv_heads=2), tokenizer=None, source="tiny"))
    windows = tokens()
    space = [Candidate(0.1, "global"), Candidate(0.25, "global"), Candidate(0.4, "global")]
    stats = collect_proxy_statistics(graph, windows, space, progress=False, a3_probes="once")
    assert list(stats.sensitivity) == [(0.25, "post_norm")]  # one set of probes for three ratios
    sensitivity = stats.sensitivity[(0.25, "post_norm")]
    ratios = {c: 0.4 for c in ("qk", "ov", "mlp")}
    probed = plan_ranks(graph.layers, {c: 0.25 for c in ratios}, {}, 1, True)
    target = plan_ranks(graph.layers, ratios, {}, 1, True)
    curves = a3_curves(graph, stats.dense, frozenset(ratios), 1e-6, None)
    moved = rescaled(sensitivity, curves, probed, target)
    attr = {"qk": "qk", "ov": "vo", "mlp": "ff"}
    for component, values in moved.items():
        for index, value in enumerate(values):
            curve, r0, r1 = curves[index][component], getattr(probed[index], attr[component]), getattr(
                target[index], attr[component])
            expected = sensitivity[component][index] / float(curve[r0])
            assert value / float(curve[r1]) == pytest.approx(expected, rel=1e-12)
    assert rescaled(sensitivity, curves, probed, probed) == sensitivity
    plans = plan_global_ranks(graph, stats.dense.a3, ratios, windows[:2], sensitivity=moved, progress=False).plans
    assert plans == stats.plans[(0.4, "global")]
