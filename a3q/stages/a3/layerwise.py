"""A³ as a part of the shared layer-by-layer calibration pass (see :mod:`a3q.calib.layerwise`).

Same closed forms as the whole-model stage; what differs is where the statistics come from: layer l's moments
are taken on the inputs produced by layers 0…l−1 *as already compressed* (and quantized, when GPTQ shares the
pass), so each layer is fitted to what it will see at inference. Each layer is rebuilt in place at its new
sizes as soon as its statistics are complete; only one layer's statistics are held at a time.

Used when a recipe puts ``a3`` (uniform allocation) right before another layer-wise stage such as ``gptq``;
alone, ``a3`` keeps its one-forward whole-model pass, which is cheaper when nothing else needs the layer inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from a3q.arch import LINEAR_PATHS, decoder_layers, describe, layer_linears
from a3q.calib.layerwise import LayerwiseStage
from a3q.graph import ModelGraph
from a3q.registry import register_layerwise
from a3q.stages.a3.apply import as_a3_graph
from a3q.stages.a3.compress import LayerResult, compress_layer
from a3q.stages.a3.ranks import LayerRanks, plan_ranks
from a3q.stages.a3.stage import A3Config, a3_metrics
from a3q.stages.a3.statistics import LayerStatistics, register_statistics_hooks


def rebuild_layer(model: Any, family: str, index: int, result: LayerResult) -> None:
    """Replace decoder layer ``index`` by a new one at ``result``'s sizes, holding ``result``'s weights."""
    config = model.config
    structure = result.structure
    config.qk_head_dims[index] = structure.qk_head_dim
    config.vo_head_dims[index] = structure.vo_head_dim
    config.intermediate_sizes[index] = structure.intermediate_size
    if getattr(config, "rope_pairs", None) is not None:
        config.rope_pairs[index] = structure.rope_pairs
    layers = decoder_layers(model, family)
    old = layers[index]
    state = old.state_dict()
    for key, tensor in result.weights.items():
        short, kind = key.split(".")
        state[f"{LINEAR_PATHS[family][short]}.{kind}"] = tensor
    reference = next(old.parameters())
    new = type(old)(config, index).to(device=reference.device, dtype=reference.dtype)
    new.load_state_dict(state, strict=True)
    new.train(old.training)
    layers[index] = new


class A3Layerwise(LayerwiseStage):
    name = "a3"

    def __init__(self, config: A3Config) -> None:
        super().__init__()
        self.config = config
        self.components = frozenset(config.components)
        self.plans: list[LayerRanks] = []
        self.statistics: LayerStatistics | None = None
        self.results: list[LayerResult] = []

    def begin(self, graph: ModelGraph) -> ModelGraph:
        graph = as_a3_graph(graph)
        self.params_before = graph.decoder_linear_params()
        self.kv_before = graph.kv_bytes_per_token()
        self.plans = plan_ranks(graph.layers, self.config.component_ratios(), self.config.explicit_ranks(),
                                self.config.rank_multiple, graph.uses_rope)
        return graph

    def observe(self, graph: ModelGraph, index: int) -> list[Any]:
        self.statistics = LayerStatistics()
        return register_statistics_hooks(graph, index, self.statistics, set(self.components))

    @torch.no_grad()
    def process(self, graph: ModelGraph, index: int) -> None:
        self.statistics.finish()
        linears = layer_linears(graph.model, graph.family, index)
        weights = {f"{short}.{kind}": getattr(module, kind) for short, module in linears.items()
                   for kind in ("weight", "bias") if getattr(module, kind, None) is not None}
        result = compress_layer(weights, graph.layers[index], self.statistics, self.plans[index], graph.uses_rope,
                                self.config.damping, self.components)
        rebuild_layer(graph.model, graph.family, index, result)
        self.results.append(result)
        self.statistics = None

    def finish(self, graph: ModelGraph) -> ModelGraph:
        compressed = describe(graph.model, graph.tokenizer, graph.source, graph.history)
        compressed.kv_cache_bits = graph.kv_cache_bits
        self.metrics = a3_metrics(self.config, self.plans, self.results, compressed, self.params_before, self.kv_before)
        self.metrics.update(calibration="shared layer-by-layer pass (inputs from the compressed layers before)")
        return compressed


@register_layerwise("a3")
def a3_layerwise(config: A3Config) -> A3Layerwise | None:
    """A³ joins a shared pass only with uniform ranks: global allocation needs every layer's statistics first."""
    return A3Layerwise(config) if config.allocation == "uniform" else None
