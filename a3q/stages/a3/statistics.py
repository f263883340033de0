"""Head-space statistics for A³, collected with hooks in one pass over the calibration windows.

Per layer, in float64 and normalised by the token count (``G = E[x xᵀ]``):

* ``g_q [h, d, d]``, ``g_k [h_kv, d, d]``: outputs of q_proj / k_proj, i.e. queries and keys
  *before* RoPE (needed in full for the NoPE SVD, only their diagonals under RoPE);
* ``g_o [h, d, d]`` (MHA): head slices of o_proj's input, the paper's per-head ``W_vᵀ R_p W_v``;
* ``g_v [h_kv, d, d]`` (GQA): outputs of v_proj, the shared value head's statistic;
* ``mlp_x2 [d_ff]``: per-channel second moment of down_proj's input;
* ``q_norm_x2 [h, d]``, ``k_norm_x2 [h_kv, d]`` (families with q/k norms): per-coordinate second moments of the
  normalised queries and keys (after the norm's gain, before RoPE), which choose the kept RoPE pairs
  (:mod:`a3q.stages.a3.qk_norm`).

Nothing of size d_model × d_model is ever built: memory is a handful of d × d matrices per head.
Which model the inputs come from (as the stage found it, or as already compressed upstream) is the stage's
``statistics`` setting; the hooks here only accumulate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from a3q.arch import FAMILIES, decoder_layers, layer_linears
from a3q.distributed import reduce_together
from a3q.graph import ModelGraph
from a3q.pipeline.runner import observe_layers

_MOMENTS = ("g_q", "g_k", "g_v", "g_o", "mlp_x2", "q_norm_x2", "k_norm_x2")


@dataclass
class LayerStatistics:
    """Second moments of one layer (see module docstring); absent entries were not requested."""

    tokens: int = 0
    g_q: Tensor | None = None
    g_k: Tensor | None = None
    g_v: Tensor | None = None
    g_o: Tensor | None = None
    mlp_x2: Tensor | None = None
    q_norm_x2: Tensor | None = None
    k_norm_x2: Tensor | None = None
    _sums: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def add(self, name: str, value: Tensor) -> None:
        self._sums[name] = self._sums[name] + value if name in self._sums else value

    def reduce(self, reduce: Callable[[Tensor], Tensor]) -> None:
        """Sum the raw sums and the token count over every process with one ``reduce`` call (before :meth:`finish`;
        see :meth:`~a3q.pipeline.stage.CalibratingStage.reduce_statistics`)."""
        if not self._sums and self.tokens == 0 and any(getattr(self, n) is not None for n in _MOMENTS):
            raise RuntimeError("LayerStatistics.reduce after finish(): reduce the sums, never the averages")
        names = sorted(self._sums)
        device = self._sums[names[0]].device if names else None
        count = torch.tensor([float(self.tokens)], dtype=torch.float64, device=device)
        *sums, tokens = reduce_together([self._sums[name] for name in names] + [count], reduce)
        self._sums = dict(zip(names, sums))
        self.tokens = int(round(float(tokens.item())))

    def finish(self) -> None:
        for name, total in self._sums.items():
            setattr(self, name, total / max(self.tokens, 1))
        self._sums.clear()


def _head_moment(values: Tensor, heads: int) -> Tensor:
    """Σ over tokens of x xᵀ per head: ``[tokens·…, heads·d] → [heads, d, d]`` in float64."""
    per_head = values.reshape(-1, heads, values.shape[-1] // heads).double()
    return torch.einsum("nhi,nhj->hij", per_head, per_head)


def _per_head_square_sum(values: Tensor, head_axis: int) -> Tensor:
    """Σ over every axis but the heads and the last of ``values²`` in float64: ``[…, heads, …, d] → [heads, d]``."""
    per_head = values.movedim(head_axis, -2)
    return per_head.double().square().reshape(-1, *per_head.shape[-2:]).sum(0)


def register_statistics_hooks(graph: ModelGraph, index: int, stats: LayerStatistics, components: set[str]) -> list:
    """Hooks on layer ``index`` that add its moments of ``components`` to ``stats``; returns the handles."""
    layer = graph.layers[index]
    linears = layer_linears(graph.model, graph.family, index)
    mha = layer.num_heads == layer.num_kv_heads
    handles = []

    def output_hook(name: str, heads: int):
        return lambda module, args, output: stats.add(name, _head_moment(output, heads))

    def input_hook(name: str, heads: int):
        return lambda module, args: stats.add(name, _head_moment(args[0], heads))

    def count_tokens(module, args):
        stats.tokens += args[0].shape[:-1].numel()

    handles.append(linears["q"].register_forward_pre_hook(count_tokens))
    if "qk" in components:
        handles.append(linears["q"].register_forward_hook(output_hook("g_q", layer.num_heads)))
        handles.append(linears["k"].register_forward_hook(output_hook("g_k", layer.num_kv_heads)))
    family = FAMILIES[graph.family]
    if "qk" in components and family.qk_norm_paths is not None:
        block = decoder_layers(graph.model, graph.family)[index]
        for name, path in zip(("q_norm_x2", "k_norm_x2"), family.qk_norm_paths):
            square_sum = lambda module, args, output, name=name: stats.add(name, _per_head_square_sum(output, family.qk_norm_head_axis))  # noqa: E731
            handles.append(block.get_submodule(path).register_forward_hook(square_sum))
    if "ov" in components and mha:
        handles.append(linears["o"].register_forward_pre_hook(input_hook("g_o", layer.num_heads)))
    if "ov" in components and not mha:
        handles.append(linears["v"].register_forward_hook(output_hook("g_v", layer.num_kv_heads)))
    if "mlp" in components:
        square_sum = lambda module, args: stats.add("mlp_x2", args[0].double().square().reshape(-1, args[0].shape[-1]).sum(0))  # noqa: E731
        handles.append(linears["down"].register_forward_pre_hook(square_sum))
    return handles


def collect_statistics(
    graph: ModelGraph, windows: Tensor, components: set[str], batch_size: int = 4, progress: bool = True
) -> list[LayerStatistics]:
    """Every layer's statistics of the model as it is, from one pass of the engine's pipeline over ``windows``.

    For benchmarks and tests that sweep budgets over one set of statistics; the ``a3`` stage observes through the
    pipeline itself.
    """
    stats = [LayerStatistics() for _ in graph.layers]
    observe_layers(graph, windows, lambda g, index: register_statistics_hooks(g, index, stats[index], components),
                   batch_size, progress, "A³ statistics")
    for layer_stats in stats:
        layer_stats.finish()
    return stats
