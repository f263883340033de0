"""The search's reuse is exact: statistics collected once for every candidate equal what the a3 and gptq stages
collect themselves, and the Hessians after A³ equal those measured on the compressed model."""

from __future__ import annotations

import copy

import pytest
import torch

from a3q.arch import describe, layer_linears
from a3q.arch.surgery import layer_weights
from a3q.engine import apply_stage
from a3q.quant.gptq import HessianAccumulator
from a3q.search.candidate import Candidate
from a3q.search.proxy import collect_proxy_statistics
from a3q.search.statistics import collect_dense_statistics
from a3q.search.weight_error import compressed_hessians, quantized_weight
from a3q.stages.a3.apply import as_a3_graph
from a3q.stages.a3.compress import compress_layer
from a3q.stages.a3.ranks import LayerRanks
from a3q.stages.a3.statistics import collect_statistics
from tests.modeling.test_gemma3 import tiny_gemma
from tests.stages.a3.test_pipeline_tiny import tiny_llama, tokens

GPTQ4 = (("bits", 4), ("group_size", 16), ("stage", "gptq"))
MOMENTS = ("g_q", "g_k", "g_v", "g_o", "mlp_x2")


def dense_graph(kv_heads: int = 2, layers: int = 2, dtype=torch.float32):
    model = tiny_llama(kv_heads)
    if layers != model.config.num_hidden_layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    return describe(model.to(dtype), tokenizer=None, source="tiny")


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_a3_moments_equal_the_a3_stages_collection(kv_heads):
    graph = as_a3_graph(dense_graph(kv_heads))
    windows = tokens()
    ours = collect_dense_statistics(graph, windows, progress=False)
    theirs = collect_statistics(graph, windows, {"qk", "ov", "mlp"}, batch_size=4, progress=False)
    for mine, stage in zip(ours.a3, theirs):
        assert mine.tokens == stage.tokens
        for name in MOMENTS:
            a, b = getattr(mine, name), getattr(stage, name)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name


def test_hessians_equal_a_brute_force_accumulation_on_the_dense_stream():
    graph = dense_graph()
    windows = tokens()
    ours = collect_dense_statistics(graph, windows, progress=False)
    inputs = {}
    hooks = []
    for index in range(len(graph.layers)):
        for short in ("q", "o", "gate", "down"):
            module = layer_linears(graph.model, "llama", index)[short]
            hooks.append(module.register_forward_pre_hook(
                lambda m, a, key=(index, short): inputs.setdefault(key, []).append(a[0].double())))
    with torch.no_grad():
        graph.model(input_ids=windows)
    for hook in hooks:
        hook.remove()
    for (index, short), captured in inputs.items():
        x = torch.cat(captured).reshape(-1, captured[0].shape[-1])
        key = {"q": "q+k+v", "o": "o", "gate": "gate+up", "down": "down"}[short]
        torch.testing.assert_close(ours.hessians[index][key], 2 * x.T @ x / x.shape[0], rtol=1e-10, atol=1e-12)


def test_a_candidates_a3_probes_and_ranks_are_the_a3_stages_own():
    graph = dense_graph()
    windows = tokens()
    candidate = Candidate(0.3, "global")
    stats = collect_proxy_statistics(graph, windows, [candidate, Candidate(0.3, "uniform")], progress=False,
                                     a3_probes="each")
    compressed, metrics = apply_stage(copy.deepcopy(graph), "a3", windows=windows, ratio=0.3, allocation="global")
    assert metrics["sensitivity"] == stats.sensitivity[(0.3, "post_norm")]
    assert stats.scores[candidate].ranks == [LayerRanks(s.qk_head_dim, s.vo_head_dim, s.intermediate_size)
                                             for s in compressed.layers]


def test_gptq_with_the_shared_hessian_gives_the_gptq_stages_codes_in_layer_0():
    """Layer 0's inputs are the same in the dense and the sequential stream: the same Hessian, the same codes."""
    graph = dense_graph()
    windows = tokens()
    dense = collect_dense_statistics(graph, windows, progress=False)
    quantized, _ = apply_stage(copy.deepcopy(graph), "gptq", windows=windows, bits=4, group_size=16)
    linears = layer_linears(graph.model, "llama", 0)
    stored = layer_linears(quantized.model, "llama", 0)
    for key, members in dense.groups[0].items():
        stacked = torch.cat([linears[s].weight.detach() for s in members])
        ours = quantized_weight(stacked, dense.hessians[0][key], GPTQ4)
        theirs = torch.cat([stored[s].dequantize(torch.float32) for s in members])
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def _measured_hessians(graph, windows) -> dict[str, torch.Tensor]:
    """Layer 0's o_proj and down_proj input Hessians, measured on ``graph``'s own forward."""
    accumulators, hooks = {}, []
    for short in ("o", "down"):
        module = layer_linears(graph.model, graph.family, 0)[short]
        accumulators[short] = HessianAccumulator(module.in_features)
        hooks.append(module.register_forward_pre_hook(lambda m, a, acc=accumulators[short]: acc.add(a[0])))
    with torch.no_grad():
        graph.model(input_ids=windows)
    for hook in hooks:
        hook.remove()
    return {short: acc.hessian() for short, acc in accumulators.items()}


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("component, short, key", [("ov", "o", "o"), ("mlp", "down", "down")])
def test_hessian_after_a3_equals_the_compressed_models_own(kv_heads, component, short, key):
    """One layer, float64, only this component compressed (so nothing upstream of its input changes): the mapped
    Hessian is the one the compressed model's forward produces."""
    graph = as_a3_graph(dense_graph(kv_heads, layers=1, dtype=torch.float64))
    windows = tokens()
    dense = collect_dense_statistics(graph, windows, progress=False)
    layer, ranks = graph.layers[0], LayerRanks(qk=16, vo=9, ff=50)
    compressed, _ = apply_stage(copy.deepcopy(graph), "a3", windows=windows, components=[component],
                                allocation="uniform", **{"vo_rank" if component == "ov" else "ff_rank": 9 if
                                                          component == "ov" else 50})
    weights = {k: v.detach() for k, v in layer_weights(graph.model, graph.family, 0).items()}
    mapped = compressed_hessians(dense.hessians[0], dense.groups[0], layer, dense.a3[0], weights, ranks, 1e-6,
                                 frozenset({component}))
    measured = _measured_hessians(compressed, windows)[short]
    assert mapped[key].shape == measured.shape
    torch.testing.assert_close(mapped[key], measured, rtol=1e-9, atol=1e-12 * float(measured.abs().max()))
    result = compress_layer(weights, layer, dense.a3[0], ranks, True, 1e-6, frozenset({component}))
    new = {k: v for k, v in layer_weights(compressed.model, compressed.family, 0).items()}
    torch.testing.assert_close(result.weights[f"{short}.weight"], new[f"{short}.weight"].detach())


def test_a_family_with_qk_norms_gets_the_a3_stages_ranks_and_probes():
    """Gemma 3 (per-head q/k norms, sliding and global layers): each allocation's own q/k-norm mode, as the stage."""
    graph = describe(tiny_gemma(), tokenizer=None, source="tiny")
    windows = torch.randint(0, 97, (6, 24), generator=torch.Generator().manual_seed(1))
    space = [Candidate(0.3, "global"), Candidate(0.3, "uniform"), Candidate(0.3, "global", GPTQ4)]
    stats = collect_proxy_statistics(graph, windows, space, progress=False, a3_probes="each")
    for allocation, mode in (("global", "post_norm"), ("uniform", "pre_norm")):
        compressed, metrics = apply_stage(copy.deepcopy(graph), "a3", windows=windows, ratio=0.3,
                                          allocation=allocation)
        assert stats.scores[Candidate(0.3, allocation)].ranks == [
            LayerRanks(s.qk_head_dim, s.vo_head_dim, s.intermediate_size) for s in compressed.layers]
        if allocation == "global":
            assert metrics["sensitivity"] == stats.sensitivity[(0.3, mode)]
    assert stats.scores[space[2]].weights > 0
