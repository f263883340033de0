"""The one calibration pass a search makes: every statistic any candidate's stages would collect, from the dense model.

Per decoder layer, in one whole-model forward through the pipeline's layer-by-layer runner
(:func:`a3q.pipeline.runner.observe_layers`):

* the A³ head-space moments of every component, by the very hooks the ``a3`` stage registers
  (:func:`a3q.stages.a3.statistics.register_statistics_hooks`), so every A³ ratio and allocation reads them;
* one GPTQ Hessian ``2 E[x xᵀ]`` per group of linears that share an input (q/k/v, o, gate/up, down), accumulated by
  GPTQ's own :class:`~a3q.quant.gptq.HessianAccumulator`, so every bit width and group size reads them.

What is exact and what is not. The A³ moments are what an ``a3`` stage with ``statistics: dense`` (its default)
collects at the same batch size: the same hooks on the same inputs (tested with ``torch.equal``). The Hessians are
the *dense* stream's: a ``gptq`` stage on the dense model measures layer 0's exactly these (tested: the same codes),
but later layers on inputs that the quantized layers before already changed (``statistics: sequential``). One pass
cannot hold every candidate's sequential stream, and the proxy only ranks candidates, so the dense Hessian stands in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from a3q.arch import SHARED_INPUTS, layer_linears
from a3q.graph import ModelGraph
from a3q.pipeline.runner import observe_layers
from a3q.quant.gptq import HessianAccumulator
from a3q.stages.a3.statistics import LayerStatistics, register_statistics_hooks

A3_COMPONENTS = frozenset({"qk", "ov", "mlp"})


def input_groups(graph: ModelGraph, index: int) -> dict[str, tuple[str, ...]]:
    """The float linears of layer ``index`` by shared input, keyed as the ``gptq`` stage keys them (``q+k+v``,
    ``o``, ``gate+up``, ``down``): one Hessian per group."""
    linears = {short for short, module in layer_linears(graph.model, graph.family, index).items()
               if isinstance(module, torch.nn.Linear)}
    order = list(layer_linears(graph.model, graph.family, index))
    groups = [tuple(s for s in shared if s in linears) for shared in SHARED_INPUTS[graph.family]]
    groups = [group for group in groups if group]
    grouped = {s for group in groups for s in group}
    groups += [(short,) for short in order if short in linears and short not in grouped]
    return {"+".join(group): group for group in groups}


@dataclass
class DenseStatistics:
    """What the pass collected: per layer, the finished A³ moments and the Hessian of each input group."""

    a3: list[LayerStatistics]
    hessians: list[dict[str, Tensor]]  # [layer] group key → 2 E[x xᵀ], float64
    groups: list[dict[str, tuple[str, ...]]]  # [layer] group key → its linears' short names
    tokens: int


@torch.no_grad()
def collect_dense_statistics(graph: ModelGraph, windows: Tensor, batch_size: int = 4,
                             progress: bool = True) -> DenseStatistics:
    """One layer-by-layer pass over ``windows`` with the A³ and the Hessian hooks on every layer at once.

    ``batch_size`` 4 is both stages' default; the sums are float64, so another batching changes them by round-off
    only (~1e-15 relative)."""
    a3 = [LayerStatistics() for _ in graph.layers]
    accumulators: list[dict[str, HessianAccumulator]] = [{} for _ in graph.layers]
    groups = [input_groups(graph, index) for index in range(len(graph.layers))]

    def observe(g: ModelGraph, index: int) -> list:
        handles = register_statistics_hooks(g, index, a3[index], set(A3_COMPONENTS))
        linears = layer_linears(g.model, g.family, index)
        for key, members in groups[index].items():
            first = linears[members[0]]
            accumulators[index][key] = HessianAccumulator(first.in_features)
            add = lambda module, args, acc=accumulators[index][key]: acc.add(args[0])  # noqa: E731
            handles.append(first.register_forward_pre_hook(add))
        return handles

    observe_layers(graph, windows, observe, batch_size, progress, "search statistics (A³ + Hessians)")
    tokens = a3[0].tokens if a3 else 0
    for stats in a3:
        stats.finish()
    hessians = [{key: acc.take_hessian() for key, acc in layer.items()} for layer in accumulators]
    return DenseStatistics(a3=a3, hessians=hessians, groups=groups, tokens=tokens)
