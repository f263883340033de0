"""Global rank allocation: the greedy is optimal on convex curves, probes equal real compression, and the
plan respects the budget, the original sizes and RoPE's even q/k ranks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from a3q.stages.a3.allocation import plan_global_ranks
from a3q.stages.a3.apply import compress_model
from a3q.stages.a3.error_curves import ErrorCurve, candidate_ranks, greedy_allocate, relative_error_curve
from a3q.stages.a3.ranks import LayerRanks, plan_ranks
from a3q.stages.a3.sensitivity import _probe_weights
from a3q.stages.a3.statistics import collect_statistics
from tests.stages.a3.test_pipeline_tiny import (
    ALL,
    graph_of,
    tiny_gpt2,
    tiny_llama,
    tokens,
)


def random_convex_curve(generator, layer, component, steps, step_size, params_per_rank) -> ErrorCurve:
    decrements = torch.rand(steps, generator=generator, dtype=torch.float64).sort(descending=True).values
    loss = [float(decrements[i:].sum()) for i in range(steps + 1)]  # loss at kept steps 0..steps, convex
    ranks = [step_size * i for i in range(steps + 1)]
    return ErrorCurve(layer, component, ranks, loss, params_per_rank)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_is_optimal_against_exhaustive_search_on_convex_curves(seed):
    generator = torch.Generator().manual_seed(seed)
    curves = [random_convex_curve(generator, i, "mlp", 4, [1, 2, 1][i], [3, 2, 5][i]) for i in range(3)]
    total = sum(c.ranks[-1] * c.params_per_rank for c in curves)
    for target in range(0, total + 1, 3):
        chosen, removed = greedy_allocate(curves, target)
        assert removed >= target
        greedy_loss = sum(c.loss[j] for c, j in zip(curves, chosen))
        best = math.inf
        for combo in itertools.product(*(range(len(c.ranks)) for c in curves)):
            gone = sum((c.ranks[-1] - c.ranks[j]) * c.params_per_rank for c, j in zip(curves, combo))
            if gone >= removed:  # any allocation removing at least as much as the greedy one
                best = min(best, sum(c.loss[j] for c, j in zip(curves, combo)))
        assert greedy_loss <= best + 1e-12


def test_greedy_respects_floors():
    generator = torch.Generator().manual_seed(0)
    curves = [random_convex_curve(generator, i, "qk", 5, 2, 1) for i in range(2)]
    curves[0].floor_index = 3
    chosen, removed = greedy_allocate(curves, 10**9)
    assert chosen == [3, 0] and removed == (10 - 6) + 10


def test_candidate_grid_is_even_under_rope_and_ends_at_the_size():
    grid, floor = candidate_ranks(64, 1, True, 0.5)
    assert grid[-1] == 64 and all(r % 2 == 0 for r in grid) and grid[floor] == 32
    grid, _ = candidate_ranks(30, 8, False, 0.5)
    assert grid == [8, 16, 24, 30]


@pytest.mark.parametrize("make, component", [
    (lambda: tiny_llama(kv_heads=2, bias=True), "qk"), (lambda: tiny_llama(kv_heads=2), "ov"),
    (lambda: tiny_llama(kv_heads=4), "ov"), (lambda: tiny_llama(kv_heads=2), "mlp"), (tiny_gpt2, "qk"), (tiny_gpt2, "ov"),
])
def test_probe_weights_equal_the_compressed_model(make, component):
    """A probe (zero-padded weights at full size) must compute exactly what the compressed model computes."""
    graph = graph_of(make())
    stats = collect_statistics(graph, tokens(), set(ALL), progress=False)
    layer = graph.layers[1]
    rank = {"qk": 6, "ov": 5, "mlp": 33}[component]
    plans = [LayerRanks(l.qk_head_dim, l.vo_head_dim, l.intermediate_size) for l in graph.layers]
    plans[1] = LayerRanks(**{**vars(plans[1]), {"qk": "qk", "ov": "vo", "mlp": "ff"}[component]: rank})
    compressed, _ = compress_model(graph, stats, plans, 1e-6, frozenset({component}), progress=False)
    from a3q.arch import LAYER_PREFIX, LINEAR_PATHS

    prefix, paths = LAYER_PREFIX[graph.family].format(index=1), LINEAR_PATHS[graph.family]
    params = dict(graph.model.named_parameters())
    weights = {f"{s}.{k}": params[f"{prefix}{p}.{k}"].detach() for s, p in paths.items() for k in ("weight", "bias")
               if f"{prefix}{p}.{k}" in params}
    probe = _probe_weights(weights, layer, stats[1], component, rank, graph.uses_rope, 1e-6)
    ids = tokens(2, 20)
    with torch.no_grad():
        for key, tensor in probe.items():
            short, kind = key.split(".")
            params[f"{prefix}{paths[short]}.{kind}"].copy_(tensor)
        torch.testing.assert_close(graph.model(input_ids=ids).logits, compressed.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_error_curves_are_convex_decreasing_and_zero_at_full_size():
    graph = graph_of(tiny_llama(kv_heads=2))
    stats = collect_statistics(graph, tokens(), set(ALL), progress=False)
    layer = graph.layers[0]
    for component in ALL:
        curve = relative_error_curve(layer, stats[0], component, True, 1e-6,
                                     w_down=graph.model.model.layers[0].mlp.down_proj.weight.detach().T,
                                     w_o=graph.model.model.layers[0].self_attn.o_proj.weight.detach())
        step = 2 if component == "qk" else 1
        values = curve[::step]
        assert float(values[-1]) == pytest.approx(0, abs=1e-12) and float(values[0]) == pytest.approx(1)
        differences = values[1:] - values[:-1]
        assert (differences <= 1e-12).all() and (differences[1:] - differences[:-1] >= -1e-12).all()


@pytest.mark.parametrize("ratio, mix", [(0.2, False), (0.45, True)])
def test_global_plan_respects_budget_sizes_and_even_rope_ranks(ratio, mix):
    graph = graph_of(tiny_llama(kv_heads=2))
    windows = tokens()
    stats = collect_statistics(graph, windows, set(ALL), progress=False)
    ratios = {c: ratio for c in ALL}
    allocation = plan_global_ranks(graph, stats, ratios, windows[:2], max_shift=0.25, mix_components=mix, progress=False)
    uniform = plan_ranks(graph.layers, ratios, {}, 1, rope=True)
    compressed, _ = compress_model(graph, stats, allocation.plans, 1e-6, frozenset(ALL), progress=False)
    uniform_graph, _ = compress_model(graph, stats, uniform, 1e-6, frozenset(ALL), progress=False)
    assert compressed.decoder_linear_params() <= uniform_graph.decoder_linear_params()
    assert graph.decoder_linear_params() - compressed.decoder_linear_params() == allocation.removed >= allocation.target
    for plan, layer in zip(allocation.plans, graph.layers):
        assert plan.qk % 2 == 0 and 0 < plan.qk <= layer.qk_head_dim
        assert 0 < plan.vo <= layer.vo_head_dim and 0 < plan.ff <= layer.intermediate_size
        assert (1 - ratio - 0.25) * layer.intermediate_size - 1 <= plan.ff <= (1 - ratio + 0.25) * layer.intermediate_size
    assert set(allocation.sensitivity) == set(ALL) and len(allocation.sensitivity["qk"]) == len(graph.layers)


def test_a3_stage_with_global_allocation_reports_per_layer_ranks():
    from tests.stages.baselines.test_baselines import run_stage

    graph = graph_of(tiny_llama(kv_heads=2))
    compressed, metrics = run_stage("a3", graph, tokens(), ratio=0.3, allocation="global", probe_windows=2)
    ranks = metrics["ranks"] if isinstance(metrics["ranks"], list) else [metrics["ranks"]] * len(graph.layers)
    assert [(r["qk"], r["vo"], r["ff"]) for r in ranks] == [
        (layer.qk_head_dim, layer.vo_head_dim, layer.intermediate_size) for layer in compressed.layers
    ]
    assert metrics["achieved_ratio"] >= 0.3 - 1e-12  # at least the uniform plan's removal, which rounds down
    assert set(metrics["sensitivity"]) == set(ALL)


def test_config_refuses_global_with_explicit_ranks_and_a3_after_a_baseline():
    from a3q.recipe import RecipeError, parse_recipe
    from a3q.stages.a3.stage import A3Config

    with pytest.raises(ValueError, match="allocation: global"):
        A3Config(ratio=0.2, qk_rank=32, allocation="global")
    raw = {"model": "smollm2-135m", "stages": [{"stage": "svd_llm", "ratio": 0.2}, {"stage": "a3", "ratio": 0.2}]}
    with pytest.raises(RecipeError) as caught:
        parse_recipe(raw)
    assert any("cannot work on the two-factor low-rank linears of stages[0] (svd_llm)" in problem
               for problem in caught.value.problems)


def test_probe_kl_from_cached_layer_inputs_equals_the_full_forward():
    import torch.nn.functional as F

    from a3q.pipeline.runner import LayerProbe

    graph = graph_of(tiny_llama(kv_heads=2))
    windows = tokens(2, 20)
    with torch.no_grad():
        reference = F.log_softmax(graph.model(input_ids=windows).logits.double(), dim=-1)
    probe = LayerProbe(graph, windows)
    assert len(probe.inputs) == len(graph.layers)
    unchanged = lambda: (lambda: None)  # noqa: E731
    assert probe.kl_after_change(0, unchanged) == pytest.approx(0, abs=1e-6)
    assert probe.kl_after_change(1, unchanged) == pytest.approx(0, abs=1e-6)
    weight = graph.model.model.layers[1].mlp.down_proj.weight

    def halve():  # a probe changes a later layer
        saved = weight.detach().clone()
        weight.data.mul_(0.5)
        return lambda: weight.data.copy_(saved)

    with torch.no_grad():
        undo = halve()
        changed = F.log_softmax(graph.model(input_ids=windows).logits.double(), dim=-1)
        undo()
    full = float((reference.exp() * (reference - changed)).sum(-1).mean())
    assert full > 0
    assert probe.kl_after_change(1, halve) == pytest.approx(full, rel=1e-3)  # float32 reference
    assert probe.kl_after_change(0, halve) == pytest.approx(full, rel=1e-3)
    with torch.no_grad():  # every change was undone
        assert torch.allclose(F.log_softmax(graph.model(input_ids=windows).logits.double(), dim=-1), reference)


def test_unbounded_shift_stops_at_the_floor():
    """max_shift ≥ the kept fraction means "unbounded within the floor": no component keeps less than min_keep."""
    graph = graph_of(tiny_llama(kv_heads=2))
    windows = tokens()
    stats = collect_statistics(graph, windows, set(ALL), progress=False)
    ratios = {c: 0.5 for c in ALL}
    bounded = plan_global_ranks(graph, stats, ratios, windows[:2], max_shift=0.1, progress=False)
    for min_keep in (0.25, 0.4):
        unbounded = plan_global_ranks(graph, stats, ratios, windows[:2], max_shift=0.99, progress=False,
                                      sensitivity=bounded.sensitivity, min_keep=min_keep)
        assert unbounded.removed >= unbounded.target
        for plan, layer in zip(unbounded.plans, graph.layers):
            assert plan.ff >= min_keep * layer.intermediate_size - 1
            assert plan.qk >= min_keep * layer.qk_head_dim - 2 and plan.vo >= min_keep * layer.vo_head_dim - 1
        spread = max(p.ff for p in unbounded.plans) - min(p.ff for p in unbounded.plans)
        assert spread >= max(p.ff for p in bounded.plans) - min(p.ff for p in bounded.plans)  # wider than ±0.1
