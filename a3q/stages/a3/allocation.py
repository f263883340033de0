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

import math
from dataclasses import dataclass, field

from torch import Tensor

from a3q.arch import LINEAR_PATHS
from a3q.graph import ModelGraph
from a3q.layer_store.hold import hold_layer
from a3q.pipeline.stage import Probe
from a3q.stages.a3.error_curves import (
    ErrorCurve,
    _joint_attention_curve,
    candidate_ranks,
    greedy_allocate,
    relative_error_curve,
)
from a3q.stages.a3.ranks import COMPONENTS, LayerRanks, plan_ranks
from a3q.stages.a3.sensitivity import measure_sensitivity
from a3q.stages.a3.statistics import LayerStatistics

SENSITIVITY_FLOOR = 1e-3
"""A probe that did not raise the loss counts as this fraction of the median sensitivity (never zero or negative)."""

MIN_KEEP = 0.25
"""Whatever ``max_shift`` allows, no component of any layer keeps less than this fraction of its size (with
``max_shift`` ≥ the kept fraction the bound is this floor alone: "unbounded within a floor")."""


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
