"""What the ``a3`` and ``kv`` stages share in the pipeline: observe head-space statistics, rebuild a layer smaller.

A subclass sets :attr:`plans` (per-layer ranks) in ``begin`` (or ``plan``); everything else is here once.
"""

from __future__ import annotations

import torch

from a3q.arch.surgery import layer_weights, rebuild_layer
from a3q.graph import ModelGraph
from a3q.pipeline.stage import CalibratingStage, Statistics
from a3q.stages.a3.apply import layer_sizes, qk_norm_setting
from a3q.stages.a3.compress import compress_layer
from a3q.stages.a3.ranks import LayerRanks
from a3q.stages.a3.statistics import LayerStatistics, register_statistics_hooks


class HeadSpaceCompression(CalibratingStage):
    """Observe a layer's A³ statistics for ``components``; process it into a smaller layer at ``plans[index]``."""

    resizes_layers = True
    checkpointed = CalibratingStage.checkpointed + ("relative_errors", "calibration_tokens")

    def __init__(self, components: frozenset[str], damping: float, statistics: Statistics, batch_size: int) -> None:
        super().__init__()
        self.components, self.damping = components, damping
        self.statistics, self.batch_size = statistics, batch_size
        self.plans: list[LayerRanks] = []
        self.qk_norm_mode = "pre_norm"  # how QK is compressed under per-head q/k norms (a3q.stages.a3.qk_norm)
        self.layer_statistics: dict[int, LayerStatistics] = {}
        self.relative_errors: list[dict[str, float]] = []  # per processed layer, by component
        self.calibration_tokens = 0

    def observe(self, graph: ModelGraph, index: int) -> list:
        self.layer_statistics[index] = LayerStatistics()
        return register_statistics_hooks(graph, index, self.layer_statistics[index], set(self.components))

    def reduce_statistics(self, index: int, reduce) -> None:
        """The layer's head-space sums and token count, summed over every process in one ``reduce`` call."""
        self.layer_statistics[index].reduce(reduce)

    @torch.no_grad()
    def process(self, graph: ModelGraph, index: int) -> None:
        statistics = self.layer_statistics.pop(index)
        self.calibration_tokens = max(self.calibration_tokens, statistics.tokens)
        statistics.finish()
        weights = layer_weights(graph.model, graph.family, index)
        result = compress_layer(weights, graph.layers[index], statistics, self.plans[index], graph.uses_rope,
                                self.damping, self.components, qk_norm_setting(graph, self.qk_norm_mode))
        rebuild_layer(graph.model, graph.family, index, result.weights, layer_sizes(result))
        graph.layers[index] = result.structure  # later stages of the pass see the layer as it now is
        self.relative_errors.append(result.relative_error)

    def state_dict(self) -> dict:
        """Plans and errors so far; a planner also keeps the statistics of the layers it has not processed yet."""
        return {**super().state_dict(), "plans": [vars(plan) for plan in self.plans],
                "layer_statistics": {str(index): vars(stats) for index, stats in self.layer_statistics.items()}}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.plans = [LayerRanks(**plan) for plan in state.pop("plans")]
        self.layer_statistics = {int(index): LayerStatistics(**stats)
                                 for index, stats in state.pop("layer_statistics").items()}
        super().load_state_dict(state)

