"""What the ``a3`` and ``kv`` stages share in the pipeline: observe head-space statistics, rebuild a layer smaller.

A subclass sets :attr:`plans` (per-layer ranks) in ``begin`` (or ``plan``); everything else is here once.
"""

from __future__ import annotations

import torch

from a3q.arch import layer_linears
from a3q.arch.surgery import rebuild_layer
from a3q.graph import ModelGraph
from a3q.pipeline.stage import CalibratingStage, Statistics
from a3q.stages.a3.apply import layer_sizes
from a3q.stages.a3.compress import LayerResult, compress_layer
from a3q.stages.a3.ranks import LayerRanks
from a3q.stages.a3.statistics import LayerStatistics, register_statistics_hooks


class HeadSpaceCompression(CalibratingStage):
    """Observe a layer's A³ statistics for ``components``; process it into a smaller layer at ``plans[index]``."""

    def __init__(self, components: frozenset[str], damping: float, statistics: Statistics, batch_size: int) -> None:
        super().__init__()
        self.components, self.damping = components, damping
        self.statistics, self.batch_size = statistics, batch_size
        self.plans: list[LayerRanks] = []
        self.layer_statistics: dict[int, LayerStatistics] = {}
        self.results: list[LayerResult] = []
        self.calibration_tokens = 0

    def observe(self, graph: ModelGraph, index: int) -> list:
        self.layer_statistics[index] = LayerStatistics()
        return register_statistics_hooks(graph, index, self.layer_statistics[index], set(self.components))

    @torch.no_grad()
    def process(self, graph: ModelGraph, index: int) -> None:
        statistics = self.layer_statistics.pop(index)
        self.calibration_tokens = max(self.calibration_tokens, statistics.tokens)
        statistics.finish()
        linears = layer_linears(graph.model, graph.family, index)
        weights = {f"{short}.{kind}": getattr(module, kind) for short, module in linears.items()
                   for kind in ("weight", "bias") if getattr(module, kind, None) is not None}
        result = compress_layer(weights, graph.layers[index], statistics, self.plans[index], graph.uses_rope,
                                self.damping, self.components)
        rebuild_layer(graph.model, graph.family, index, result.weights, layer_sizes(result))
        self.results.append(result)
