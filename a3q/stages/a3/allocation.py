"""Global (mixed) rank allocation for A³: spend the parameter budget where it costs the least loss.

The A³ objectives give each component's error at *every* rank in closed form: tail sums of sorted pair
or channel scores (CUR paths) and of squared singular values (SVD paths). Those errors are in different
units (score energy vs output energy) and a unit of error does not hurt the loss equally in every layer,
so they cannot be added as they are. Moving budget by raw relative error was worse than uniform.

**Normalisation (measured sensitivity).** For every layer ℓ and component c we measure, once, the real
effect ``s_ℓc`` of compressing only (ℓ, c) at the probe ratio (the stage's ratio) on a few calibration windows:
the KL divergence of the model's next-token distribution from the unmodified model's (see ``measure_sensitivity``), and
model the loss of rank r as ``s_ℓc · e_ℓc(r) / e_ℓc(r_probe)``. Why this form:
near a trained optimum the loss grows with the second moment of the output perturbation, and the
closed-form error *is* that second moment (up to the A³ approximations), so the ratio of errors carries
the shape of the curve and the probe fixes its scale in loss units.

**Allocation.** Minimise ``Σ s_ℓc e_ℓc(r_ℓc)/e_ℓc(r_probe)`` subject to removing at least the uniform plan's
parameters, with ``r`` on each component's grid (even under RoPE, multiples of ``rank_multiple``), never above
the current size, and within ``±max_shift`` of the uniform kept fraction (default 0.3, the best measured of
0.1/0.2/0.3/unbounded on SmolLM2 at 10/20/30%; the linear loss model is only trusted near the probe: unbounded, with
loss-change probes, the greedy went all-or-nothing on whole MLPs and lost; with KL probes unbounded was slightly worse
than ±0.3), and never below ``MIN_KEEP`` of the size. By default each
component keeps its own budget and only moves it between layers (``mix_components`` lifts that; moving budget
from the MLP to QK/OV measured worse). Greedy: repeatedly take the step with the smallest loss increase per
parameter removed. The curves are convex (sorted tails), so every greedy point is a Lagrangian optimum: no
allocation that removes at least as many parameters has a smaller modelled loss (tested by exhaustive search).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from a3q.arch import FAMILIES, LINEAR_PATHS
from a3q.graph import LayerStructure, ModelGraph
from a3q.layer_store.hold import hold_layer
from a3q.pipeline.runner import LayerProbe
from a3q.pipeline.stage import Probe
from a3q.stages.a3.compress import compress_layer
from a3q.stages.a3.mlp import mlp_channel_scores, select_channels
from a3q.stages.a3.ov import ov_svd
from a3q.stages.a3.qk import pair_coordinates, qk_svd, rope_pair_scores, select_rope_pairs
from a3q.stages.a3.qk_norm import qk_pair_scores, zero_padded_trial
from a3q.stages.a3.ranks import COMPONENTS, LayerRanks, allowed_head_dims, plan_ranks, round_rank
from a3q.stages.a3.statistics import LayerStatistics

SENSITIVITY_FLOOR = 1e-3
"""A probe that did not raise the loss counts as this fraction of the median sensitivity (never zero or negative)."""

MIN_KEEP = 0.25
"""Whatever ``max_shift`` allows, no component of any layer keeps less than this fraction of its size (with
``max_shift`` ≥ the kept fraction the bound is this floor alone: "unbounded within a floor")."""


@dataclass
class ErrorCurve:
    """One (layer, component): candidate ranks (ascending), the modelled loss at each, and params per unit rank."""

    layer: int
    component: str
    ranks: list[int]
    loss: list[float]
    params_per_rank: int
    floor_index: int = 0


@dataclass
class Allocation:
    """The chosen per-layer ranks, with the curves' scales so a report can say why."""

    plans: list[LayerRanks]
    sensitivity: dict[str, list[float]] = field(default_factory=dict)
    removed: int = 0
    target: int = 0

    def summary(self) -> str:
        """Ranges of each component's ranks across layers."""
        parts = []
        for name, key in (("q/k", "qk"), ("v/o", "vo"), ("ff", "ff")):
            values = [getattr(p, key) for p in self.plans]
            parts.append(f"{name} {min(values)}–{max(values)}")
        return ", ".join(parts)


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


def _probe_weights(weights, layer: LayerStructure, stats: LayerStatistics, component: str, rank: int,
                   rope: bool, damping: float, qk_norm: tuple[float, str] | None = None) -> dict[str, Tensor]:
    """Full-size weights equal to the layer with only ``component`` compressed to ``rank``.

    Compressed coordinates are zero-padded back to the current sizes (RoPE q/k: dropped pairs zeroed in place,
    so each kept pair keeps its frequency), so the probe needs no new model: it swaps tensors in and out. With q/k
    norms (``qk_norm``) the norms' weights change too (:func:`a3q.stages.a3.qk_norm.zero_padded_trial`).
    """
    out: dict[str, Tensor] = {}
    dtype, device = weights["q.weight"].dtype, weights["q.weight"].device
    if component == "qk" and qk_norm is not None:
        kept_pairs = select_rope_pairs(qk_pair_scores(stats, layer, qk_norm[1]), rank)
        return zero_padded_trial(weights, stats, layer, pair_coordinates(kept_pairs, layer.qk_head_dim), qk_norm[0])
    if component == "mlp":
        channels = select_channels(mlp_channel_scores(stats.mlp_x2, weights["down.weight"].T), rank)
        mask = torch.zeros(layer.intermediate_size, dtype=dtype, device=device)
        mask[channels] = 1
        out["down.weight"] = weights["down.weight"] * mask[None, :]
        return out
    group = layer.num_heads // layer.num_kv_heads
    if component == "qk" and rope:
        d, half = layer.qk_head_dim, layer.qk_head_dim // 2
        q_mask = torch.zeros(layer.num_heads, d, dtype=dtype, device=device)
        k_mask = torch.zeros(layer.num_kv_heads, d, dtype=dtype, device=device)
        for kv in range(layer.num_kv_heads):
            heads = range(kv * group, (kv + 1) * group)
            scores = rope_pair_scores(torch.stack([stats.g_q[h].diagonal() for h in heads]), stats.g_k[kv].diagonal())
            pairs = select_rope_pairs(scores, rank)
            coords = torch.cat([pairs, pairs + half])
            k_mask[kv, coords] = 1
            for h in heads:
                q_mask[h, coords] = 1
        for name, mask in (("q", q_mask), ("k", k_mask)):
            out[f"{name}.weight"] = weights[f"{name}.weight"] * mask.reshape(-1, 1)
            if f"{name}.bias" in weights:
                out[f"{name}.bias"] = weights[f"{name}.bias"] * mask.reshape(-1)
        return out
    ranks = LayerRanks(qk=rank if component == "qk" else layer.qk_head_dim,
                       vo=rank if component == "ov" else layer.vo_head_dim, ff=layer.intermediate_size)
    result = compress_layer(weights, layer, stats, ranks, rope, damping, frozenset({component}))
    d = layer.qk_head_dim if component == "qk" else layer.vo_head_dim
    row_names = ("q", "k") if component == "qk" else ("v",)
    for name in row_names:
        for kind in ("weight", "bias"):
            key = f"{name}.{kind}"
            if key in result.weights:
                tensor = result.weights[key]
                blocks = tensor.reshape(-1, rank, *tensor.shape[1:])
                padded = torch.zeros(blocks.shape[0], d, *tensor.shape[1:], dtype=tensor.dtype, device=tensor.device)
                padded[:, :rank] = blocks
                out[key] = padded.reshape(-1, *tensor.shape[1:])
    if component == "ov":
        o = result.weights["o.weight"].reshape(-1, layer.num_heads, rank)
        padded = torch.zeros(o.shape[0], layer.num_heads, d, dtype=o.dtype, device=o.device)
        padded[:, :, :rank] = o
        out["o.weight"] = padded.reshape(o.shape[0], -1)
    return out


def measure_sensitivity(graph: ModelGraph, statistics: list[LayerStatistics], probe_ranks: list[LayerRanks],
                        probe: Probe | Tensor, components: frozenset[str], damping: float,
                        progress: bool = True, qk_norm: tuple[float, str] | None = None) -> dict[str, list[float]]:
    """KL to the unmodified model when only one (layer, component) is compressed to its probe rank.

    ``probe`` is the pipeline's :class:`~a3q.pipeline.runner.LayerProbe` (or the windows to build one on).

    Why KL and not the change of loss: compressing one component at 20% changes the loss by ~0.005 nats, and on a
    few hundred tokens that change was mostly noise (half the probes *lowered* the loss). The KL to the dense
    model's predictions is never negative, measures the perturbation itself, and equals the expected loss increase
    to first order when the model is calibrated.
    """
    if isinstance(probe, Tensor):
        probe = LayerProbe(graph, probe)
    paths = dict(LINEAR_PATHS[graph.family])
    if FAMILIES[graph.family].qk_norm_paths is not None:
        paths.update(zip(("q_norm", "k_norm"), FAMILIES[graph.family].qk_norm_paths))
    sensitivity = {c: [0.0] * len(graph.layers) for c in components}
    jobs = [(i, c) for i in range(len(graph.layers)) for c in COMPONENTS if c in components]
    for index, component in tqdm(jobs, desc="A³ sensitivity", disable=not progress, leave=False):
        with hold_layer(graph, index) as layer:  # an offloaded layer stays in memory for the trial
            params = dict(layer.named_parameters())
            weights = {f"{s}.{k}": params[f"{p}.{k}"].detach() for s, p in paths.items() for k in ("weight", "bias")
                       if f"{p}.{k}" in params}
            rank = {"qk": probe_ranks[index].qk, "ov": probe_ranks[index].vo, "mlp": probe_ranks[index].ff}[component]
            trial = _probe_weights(weights, graph.layers[index], statistics[index], component, rank, graph.uses_rope,
                                   damping, qk_norm)

            @torch.no_grad()
            def swap_in(trial=trial, params=params, weights=weights):
                saved = {key: weights[key].clone() for key in trial}
                for key, tensor in trial.items():
                    short, kind = key.split(".")
                    params[f"{paths[short]}.{kind}"].copy_(tensor)

                @torch.no_grad()
                def restore():
                    for key, tensor in saved.items():
                        short, kind = key.split(".")
                        params[f"{paths[short]}.{kind}"].copy_(tensor)
                return restore

            sensitivity[component][index] = probe.kl_after_change(index, swap_in)
    return sensitivity


def plan_global_ranks(graph: ModelGraph, statistics: list[LayerStatistics], ratios: dict[str, float | None],
                      probe: Probe | Tensor, multiple: int = 1, damping: float = 1e-6, max_shift: float = 0.3,
                      mix_components: bool = False, progress: bool = True,
                      sensitivity: dict[str, list[float]] | None = None, min_keep: float = MIN_KEEP,
                      qk_norm: tuple[float, str] | None = None, head_dims: str = "any") -> Allocation:
    """Per-layer ranks removing at least what the uniform plan removes, at the smallest modelled loss.

    The budget is the uniform plan's (``ratios`` rounded as ``plan_ranks`` rounds them), so global and uniform
    are compared at the same size or global is smaller. Each component of each layer keeps between
    ``max(1 − ρ − max_shift, min_keep)`` and ``1 − ρ + max_shift`` of its size (the modelled loss is only trusted near the probe;
    unbounded, the greedy went all-or-nothing and lost to uniform). Without ``mix_components`` every component
    keeps its own uniform budget and only moves it between layers (moving budget between components was worse
    in measurements). ``sensitivity`` may be passed to reuse earlier probes. ``qk_norm``: ``(gain offset, mode)``
    in a family with per-head q/k norms (as :func:`a3q.stages.a3.apply.qk_norm_setting` gives it).

    ``head_dims`` (``vllm-cpu``, ``flash``): q/k and v/o of a layer share one head size from the backend's grid, so
    a server runs them unpadded. They become one curve per layer (the two modelled losses added) on that coarse grid,
    free of ``max_shift`` (the grid's steps are wider than the band), with the attention's share of the budget; what
    the grid's steps leave over or take beyond it moves to the MLP's share, so the total budget is the same.
    """
    components = frozenset(c for c in COMPONENTS if ratios.get(c) is not None)
    uniform = plan_ranks(graph.layers, ratios, {}, multiple, graph.uses_rope)
    if sensitivity is None:
        sensitivity = measure_sensitivity(graph, statistics, uniform, probe, components, damping, progress, qk_norm)
    values = sorted(abs(v) for c in components for v in sensitivity[c])
    floor = SENSITIVITY_FLOOR * max(values[len(values) // 2], 1e-12)
    paths = LINEAR_PATHS[graph.family]
    curves: dict[str, list[ErrorCurve]] = {c: [] for c in components}
    targets = {c: 0 for c in components}
    offset = 0  # parameters removed by starting each curve at its ceiling instead of the full size
    kept = [{"qk": layer.qk_head_dim, "ov": layer.vo_head_dim, "mlp": layer.intermediate_size} for layer in graph.layers]
    joint = head_dims != "any" and {"qk", "ov"} <= components
    if joint:
        curves["attn"], targets["attn"] = [], 0
    for index, layer in enumerate(graph.layers):
        with hold_layer(graph, index) as held:  # the two weights the error curves need (an offloaded layer: read)
            w_down = held.get_submodule(paths["down"]).weight.detach().T.clone()
            w_o = held.get_submodule(paths["o"]).weight.detach().clone()
        per_rank = {"qk": graph.hidden_size * (layer.num_heads + layer.num_kv_heads),
                    "ov": graph.hidden_size * (layer.num_heads + layer.num_kv_heads),
                    "mlp": graph.hidden_size * (3 if layer.gated_mlp else 2)}
        probe = {"qk": uniform[index].qk, "ov": uniform[index].vo, "mlp": uniform[index].ff}
        scaled: dict[str, Tensor] = {}  # the joint attention curve's parts: modelled loss at every rank
        for component in sorted(components, key=COMPONENTS.index):
            if joint and component in ("qk", "ov"):
                relative = relative_error_curve(layer, statistics[index], component, graph.uses_rope, damping,
                                                w_down=w_down, w_o=w_o, qk_norm=qk_norm)
                rank = probe[component]
                scaled[component] = max(sensitivity[component][index], floor) / max(float(relative[rank]), 1e-12) \
                    * relative
                continue
            size, even = kept[index][component], graph.uses_rope and component == "qk"
            keep = 1 - ratios[component]
            grid, floor_index = candidate_ranks(size, multiple, even, max(keep - max_shift, min(min_keep, keep)))
            ceiling = max(probe[component], min(size, math.floor((keep + max_shift) * size)))
            top = max(i for i, r in enumerate(grid) if r <= ceiling or i == 0)
            if grid[top] < probe[component]:  # the probe rank is always reachable
                top = grid.index(probe[component])
            grid, floor_index = grid[: top + 1], min(floor_index, top, grid.index(probe[component]))
            targets[component] += (grid[-1] - probe[component]) * per_rank[component]
            offset += (size - grid[-1]) * per_rank[component]
            kept[index][component] = grid[-1]
            relative = relative_error_curve(
                layer, statistics[index], component, graph.uses_rope, damping,
                w_down=w_down, w_o=w_o, qk_norm=qk_norm,
            )
            scale = max(sensitivity[component][index], floor) / max(float(relative[probe[component]]), 1e-12)
            curves[component].append(ErrorCurve(index, component, grid, [scale * float(relative[r]) for r in grid],
                                                per_rank[component], floor_index))
        if joint:
            curve, start, budget = _joint_attention_curve(index, layer, scaled, per_rank, probe, min_keep, head_dims)
            curves["attn"].append(curve)
            offset += start
            targets["attn"] += budget - start
    order = ["attn", "mlp"] if joint else [c for c in COMPONENTS if c in components]
    groups = [order] if mix_components else [[c] for c in order]
    removed_total, target_total, carried = offset, offset, 0
    for group in groups:
        group_curves = [curve for c in group for curve in curves[c]]
        target = sum(targets[c] for c in group) + carried
        chosen, removed = greedy_allocate(group_curves, target)
        for curve, choice in zip(group_curves, chosen):
            for component in ("qk", "ov") if curve.component == "attn" else (curve.component,):
                kept[curve.layer][component] = curve.ranks[choice]
        if "attn" in group:  # the grid's coarse steps: the rest of the budget (or the excess) is the MLP's
            carried = target - removed
        removed_total, target_total = removed_total + removed, target_total + target
    plans = [LayerRanks(qk=k["qk"], vo=k["ov"], ff=k["mlp"]) for k in kept]
    return Allocation(plans=plans, sensitivity=sensitivity, removed=removed_total, target=target_total)
