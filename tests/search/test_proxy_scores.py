"""The proxy's scores: zero for the dense model, larger for more compression, its formulas against brute force,
and clear refusals."""

from __future__ import annotations

import pytest
import torch

from a3q.arch import describe
from a3q.arch.surgery import as_a3_graph
from a3q.search.candidate import Candidate
from a3q.search.probes import a3_curves, modelled_a3_loss
from a3q.search.proxy import collect_proxy_statistics, proxy_score
from a3q.search.weight_error import quantization_error, quantized_weight
from a3q.stages.a3.ranks import plan_ranks
from tests.stages.a3.test_pipeline_tiny import tiny_llama, tokens


def gptq(bits: int, group_size: int = 16):
    return (("bits", bits), ("group_size", group_size), ("stage", "gptq"))


NF4 = (("blocksize", 32), ("quant_type", "nf4"), ("stage", "bnb"))
INT8 = (("quant_type", "int8"), ("stage", "bnb"))


def kv(ratio: float):
    return (("kv_ratio", ratio), ("stage", "kv"))


@pytest.fixture(scope="module")
def scored():
    torch.manual_seed(0)
    graph = describe(tiny_llama(kv_heads=2), tokenizer=None, source="tiny")
    space = [Candidate(), Candidate(weights=gptq(8)), Candidate(weights=gptq(4)), Candidate(weights=gptq(3)),
             Candidate(weights=gptq(2)), Candidate(weights=NF4), Candidate(weights=INT8),
             Candidate(0.1, "uniform"), Candidate(0.25, "uniform"), Candidate(0.4, "uniform"),
             Candidate(0.1, "global"), Candidate(0.25, "global"), Candidate(0.4, "global"),
             Candidate(0.25, "global", gptq(4)), Candidate(0.25, "global", gptq(2)),
             Candidate(kv=kv(0.2)), Candidate(kv=kv(0.5)), Candidate(0.25, "global", kv=kv(0.3)),
             Candidate(kv=(("bits", 4), ("stage", "kv")))]
    return graph, collect_proxy_statistics(graph, tokens(), space, progress=False)


def test_the_dense_model_scores_zero_and_every_change_scores_above(scored):
    _, stats = scored
    for candidate in stats.scores:
        score = proxy_score(stats, candidate)
        if candidate == Candidate():
            assert score == 0.0
        elif candidate.kv == (("bits", 4), ("stage", "kv")):
            assert score == 0.0  # a quantized cache is not modelled (the module docstring says so)
        else:
            assert score > 0.0, candidate.key


@pytest.mark.parametrize("series", [
    [Candidate(weights=gptq(8)), Candidate(weights=gptq(4)), Candidate(weights=gptq(3)), Candidate(weights=gptq(2))],
    [Candidate(weights=INT8), Candidate(weights=NF4)],
    [Candidate(0.1, "uniform"), Candidate(0.25, "uniform"), Candidate(0.4, "uniform")],
    [Candidate(0.1, "global"), Candidate(0.25, "global"), Candidate(0.4, "global")],
    [Candidate(0.25, "global"), Candidate(0.25, "global", gptq(4)), Candidate(0.25, "global", gptq(2))],
    [Candidate(kv=kv(0.2)), Candidate(kv=kv(0.5))],
    [Candidate(0.25, "global"), Candidate(0.25, "global", kv=kv(0.3))],
])
def test_more_compression_scores_higher(scored, series):
    _, stats = scored
    scores = [proxy_score(stats, candidate) for candidate in series]
    assert scores == sorted(scores) and len(set(scores)) == len(scores), [c.key for c in series]


def test_a3_term_is_the_probe_sum_for_uniform_ranks_and_the_allocators_optimum_for_global(scored):
    """Brute force: uniform ranks are the probe ranks, so the modelled loss is Σ max(s, floor); the global plan
    minimises the same model over plans that remove at least as much, of which the uniform plan is one."""
    graph, stats = scored
    sensitivity = stats.sensitivity[(0.25, "post_norm")]
    values = sorted(abs(v) for c in sensitivity for v in sensitivity[c])
    floor = 1e-3 * values[len(values) // 2]
    assert stats.scores[Candidate(0.25, "uniform")].a3 == pytest.approx(
        sum(max(v, floor) for c in sensitivity for v in sensitivity[c]), rel=1e-12)
    assert stats.scores[Candidate(0.25, "global")].a3 <= stats.scores[Candidate(0.25, "uniform")].a3
    ratios = {"qk": 0.25, "ov": 0.25, "mlp": 0.25}
    uniform = plan_ranks(graph.layers, ratios, {}, 1, True)
    curves = a3_curves(as_a3_graph(graph), stats.dense, frozenset(ratios), 1e-6, None)
    for candidate_plans in (stats.plans[(0.25, "global")], uniform):
        brute = 0.0
        for index, plan in enumerate(candidate_plans):
            for component, attr in (("qk", "qk"), ("ov", "vo"), ("mlp", "ff")):
                curve = curves[index][component]
                brute += max(sensitivity[component][index], floor) * float(curve[getattr(plan, attr)]) \
                    / float(curve[getattr(uniform[index], attr)])
        assert modelled_a3_loss(curves, sensitivity, uniform, candidate_plans) == pytest.approx(brute, rel=1e-12)


def test_weight_error_is_the_output_error_brute_force():
    """``err = ‖X (W − Q)ᵀ‖² / ‖X Wᵀ‖²`` with the Hessian ``2 XᵀX / n``, in float64."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 32, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, 32, dtype=torch.float64)
    weight = torch.randn(24, 32, generator=generator, dtype=torch.float64)
    hessian = 2 * x.T @ x / x.shape[0]
    for fields in (gptq(3), gptq(4, -1)):
        q = quantized_weight(weight, hessian, fields)
        brute = float(((x @ (weight - q).T) ** 2).sum() / ((x @ weight.T) ** 2).sum())
        assert quantization_error(weight, hessian, fields) == pytest.approx(brute, rel=1e-9)
        assert len(torch.unique(q[0, :16])) <= 2 ** fields[0][1]  # one group of one row: at most 2^bits levels


def test_refusals_name_the_field(scored):
    graph, stats = scored
    with pytest.raises(ValueError, match="candidates"):
        collect_proxy_statistics(graph, tokens(), [], progress=False)
    with pytest.raises(ValueError, match="weights.stage"):
        collect_proxy_statistics(graph, tokens(), [Candidate(weights=(("stage", "lora"),))], progress=False)
    with pytest.raises(ValueError, match="bits"):
        collect_proxy_statistics(graph, tokens(), [Candidate(weights=gptq(5))], progress=False)
    with pytest.raises(KeyError, match="a3-0.33-global"):
        proxy_score(stats, Candidate(0.33, "global"))
