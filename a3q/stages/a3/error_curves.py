"""The error curves global allocation works on, and the greedy over them (:mod:`a3q.stages.a3.allocation`).

Each (layer, component) has a closed-form error at every rank: tail sums of sorted pair or channel scores (CUR paths)
and of squared singular values (SVD paths), relative to the error at rank 0. The curves are convex and decreasing
(tested), so the greedy below, which always takes the step with the least modelled loss per parameter removed, stops
at Lagrangian optima (tested against exhaustive search).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from a3q.graph import LayerStructure
from a3q.stages.a3.mlp import mlp_channel_scores
from a3q.stages.a3.ov import ov_svd
from a3q.stages.a3.qk import qk_svd, rope_pair_scores
from a3q.stages.a3.qk_norm import qk_pair_scores
from a3q.stages.a3.ranks import allowed_head_dims, round_rank
from a3q.stages.a3.statistics import LayerStatistics


@dataclass
class ErrorCurve:
    """One (layer, component): candidate ranks (ascending), the modelled loss at each, and params per unit rank."""

    layer: int
    component: str
    ranks: list[int]
    loss: list[float]
    params_per_rank: int
    floor_index: int = 0


def relative_error_curve(layer: LayerStructure, stats: LayerStatistics, component: str, rope: bool,
                         damping: float, w_down: Tensor | None = None, w_o: Tensor | None = None,
                         qk_norm: tuple[float, str] | None = None) -> Tensor:
    """Relative closed-form error at every rank 0…size (index = rank); convex and decreasing to 0.

    ``qk_norm``: ``(gain offset, mode)`` in a family with per-head q/k norms, whose QK keeps one set of pairs for
    every KV group (:func:`a3q.stages.a3.qk_norm.qk_pair_scores`)."""
    if component == "mlp":
        scores = mlp_channel_scores(stats.mlp_x2, w_down).sort(descending=True).values
        return _tail(scores[None, :])
    group = layer.num_heads // layer.num_kv_heads
    if component == "qk" and rope:
        if qk_norm is not None:  # one set of pairs shared by every KV group
            pair_scores = qk_pair_scores(stats, layer, qk_norm[1]).sort(descending=True).values[None]
        else:
            pair_scores = torch.stack([
                rope_pair_scores(torch.stack([stats.g_q[h].diagonal() for h in range(kv * group, (kv + 1) * group)]),
                                 stats.g_k[kv].diagonal()).sort(descending=True).values
                for kv in range(layer.num_kv_heads)
            ])
        pairs = _tail(pair_scores)  # index = kept pairs
        return torch.repeat_interleave(pairs, 2)[: 2 * pairs.shape[0] - 1]  # rank 2p keeps p pairs (odd ranks unused)
    energies = []
    for kv in range(layer.num_kv_heads):
        heads = list(range(kv * group, (kv + 1) * group))
        if component == "qk":
            energies.append(qk_svd(stats.g_q[heads], stats.g_k[kv], 1, damping).singular_values.square())
        else:
            d = layer.vo_head_dim
            moment = stats.g_o[kv] if group == 1 else stats.g_v[kv]
            slices = torch.stack([w_o[:, h * d : (h + 1) * d].T for h in heads])
            energies.append(ov_svd(moment, slices, 1, damping).singular_values.square())
    return _tail(torch.stack(energies))


def _tail(sorted_energy: Tensor) -> Tensor:
    """``[groups, n]`` descending energies → relative dropped energy at kept count 0…n (summed over groups)."""
    energy = sorted_energy.double().sum(0)
    total = float(energy.sum()) or 1.0
    kept = torch.cat([torch.zeros(1, dtype=torch.float64, device=energy.device), energy.cumsum(0)])
    return (1.0 - kept / total).clamp_min(0.0)


def greedy_allocate(curves: list[ErrorCurve], params_to_remove: int) -> tuple[list[int], int]:
    """Indices into each curve's ``ranks`` after greedily removing ≥ ``params_to_remove`` parameters.

    Starts at the top of every curve and takes the cheapest step (loss increase per parameter) each time.
    Returns the chosen indices and the parameters removed; stops early if every curve is at its floor.
    """
    chosen = [len(c.ranks) - 1 for c in curves]
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        j = chosen[i]
        if j > curves[i].floor_index:
            c = curves[i]
            cost = (c.loss[j - 1] - c.loss[j]) / ((c.ranks[j] - c.ranks[j - 1]) * c.params_per_rank)
            heapq.heappush(heap, (cost, i, j))

    for i in range(len(curves)):
        push(i)
    removed = 0
    while removed < params_to_remove and heap:
        _, i, j = heapq.heappop(heap)
        if chosen[i] != j:
            continue
        c = curves[i]
        removed += (c.ranks[j] - c.ranks[j - 1]) * c.params_per_rank
        chosen[i] = j - 1
        push(i)
    return chosen, removed


def _joint_attention_curve(index: int, layer: LayerStructure, scaled: dict[str, Tensor], per_rank: dict[str, int],
                           probe: dict[str, int], min_keep: float, head_dims: str) -> tuple[ErrorCurve, int, int]:
    """One layer's q/k and v/o as one curve on the backend's head-size grid (``head_dims``): its modelled loss is the
    two components' added, its cost per unit of head size theirs added. Returns the curve, the parameters removed by
    starting at the grid's top (a head dim the grid lacks), and the attention's budget (the uniform plan's)."""
    size = min(layer.qk_head_dim, layer.vo_head_dim)
    grid = allowed_head_dims(head_dims, size) or [size]
    floor_index = next((i for i, r in enumerate(grid) if r >= min_keep * size), len(grid) - 1)
    loss = [float(scaled["qk"][r] + scaled["ov"][r]) for r in grid]
    start = (layer.qk_head_dim - grid[-1]) * per_rank["qk"] + (layer.vo_head_dim - grid[-1]) * per_rank["ov"]
    budget = (layer.qk_head_dim - probe["qk"]) * per_rank["qk"] + (layer.vo_head_dim - probe["ov"]) * per_rank["ov"]
    curve = ErrorCurve(index, "attn", grid, loss, per_rank["qk"] + per_rank["ov"], min(floor_index, len(grid) - 1))
    return curve, start, budget


def candidate_ranks(size: int, multiple: int, even: bool, min_keep: float) -> tuple[list[int], int]:
    """The rank grid of one component (ascending, ending at ``size``) and the index of its floor."""
    step = math.lcm(multiple, 2) if even else multiple
    grid = sorted({r for r in range(step, size + 1, step)} | {size})
    floor = round_rank(min_keep * size, size, multiple, even)
    floor_index = next((i for i, r in enumerate(grid) if r >= floor), len(grid) - 1)
    return grid, floor_index
