"""KL probes that put every proxy term in one unit (estimated KL, nats per token), and A³'s modelled loss.

**A³.** The ``a3`` stage's global allocation measures, per (layer, component), the KL of compressing only that
component to the uniform plan's rank (:func:`a3q.stages.a3.sensitivity.measure_sensitivity`), and models the loss of
any rank r as ``s · e(r) / e(r_probe)`` with ``e`` the closed-form error curve. The probes depend on the ratio
(through the probe rank), the statistics, the probe windows, the damping and the q/k-norm mode, nothing else: so
the search probes once per distinct (ratio, q/k-norm mode), on the same windows the stage would use, and the plan it
gets is the stage's plan (tested). A uniform plan *is* the probe plan, so its modelled loss is the probes' sum; a
global plan's is the allocator's own objective at the ranks it chose.

**Weights.** Per quantizer, per (layer, input group) a coefficient ``k_ℓg``: the KL of the quantizer's error on the
group's dense weights over its relative H-weighted error (:mod:`a3q.search.weight_error`), and a candidate's loss is
``Σ k_ℓg · err_ℓg`` with the errors of the weights it will hold. Why this form: for small perturbations both the KL
and the relative error are quadratic in the weight error, so their ratio is a per-group constant (the argument the
A³ allocator makes for ``s / e(r_probe)``). The KLs are the output-Fisher estimates (:mod:`a3q.search.fisher`),
scaled by one probe per quantizer (:func:`weight_sensitivity`). Why per quantizer: the diagonal Fisher's bias
depends on the quantizer (SmolLM2, every layer at once: nf4 measured 0.87× its estimate, GPTQ 4-bit g64 2.75×, as
GPTQ's errors are fitted to the dense inputs and hurt more once every layer's inputs shift).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from a3q.arch import LINEAR_PATHS
from a3q.arch.surgery import layer_weights
from a3q.graph import ModelGraph
from a3q.layer_store.hold import hold_layer
from a3q.pipeline.runner import LayerProbe
from a3q.quant.gptq import weighted_relative_error
from a3q.search.fisher import fisher_kl
from a3q.search.statistics import DenseStatistics
from a3q.search.weight_error import quantized_weight
from a3q.stages.a3.allocation import SENSITIVITY_FLOOR
from a3q.stages.a3.error_curves import relative_error_curve
from a3q.stages.a3.ranks import COMPONENTS, LayerRanks

PROBE_KL = 0.05
"""The Fisher-estimated KL (nats per token) of the one probe that scales the weight terms: second order, well above
float32 round-off."""


def weight_sensitivity(graph: ModelGraph, dense: DenseStatistics, fisher: list[dict[str, Tensor]], probe: LayerProbe,
                       quantizer: tuple[tuple[str, Any], ...], progress: bool = True
                       ) -> tuple[list[dict[str, float]], float]:
    """KL per unit of relative quantization error, per layer and input group, and the probe's scale on the Fisher.

    Each group's dense weights are quantized with ``quantizer``; its Fisher estimate of the KL
    (:func:`a3q.search.fisher.fisher_kl`) over its relative error is the group's coefficient. Then ONE probe measures
    the KL with every group changed at once, and every coefficient is multiplied by measured / estimated: the Fisher
    gives the shape across layers and groups, the probe the units (the same split as the A³ allocator's curves and
    probes). Needs the model in memory (the probe changes every layer at once).

    The probe changes each weight by ``α·(Q − W)``, ``α ≤ 1`` such that the Fisher estimates ``PROBE_KL`` for the
    whole change: inside the second-order regime, where the additive model the score uses holds. Why not the full
    quantization everywhere: on SmolLM2, GPTQ 3-bit g64 (dense-stream Hessians) in every layer at once measured 1.49
    nats of KL, 2.7× the Fisher's estimate, but 1.96× at the shrunk strength, while the real, sequential GPTQ lost
    1.01 nats of log-perplexity (the proxy: 1.07): the all-at-once trial compounds errors that the real quantizer
    corrects as it goes.
    """
    paths = LINEAR_PATHS[graph.family]
    estimates: list[dict[str, tuple[float, float]]] = [{} for _ in graph.layers]
    trials: list[tuple[list[torch.nn.Parameter], Tensor]] = []
    jobs = [(index, key) for index in range(len(graph.layers)) for key in dense.groups[index]]
    for index, key in tqdm(jobs, desc="weight sensitivity", disable=not progress, leave=False):
        with hold_layer(graph, index) as layer:
            params = [layer.get_submodule(paths[short]).weight for short in dense.groups[index][key]]
        stacked = torch.cat([p.detach() for p in params])
        hessian = dense.hessians[index][key]
        trial = quantized_weight(stacked, hessian, quantizer)
        error = weighted_relative_error(stacked, trial, hessian)
        estimates[index][key] = (fisher_kl(fisher[index][key], stacked, trial, hessian), error)
        trials.append((params, trial - stacked))
    estimated = sum(kl for layer in estimates for kl, _ in layer.values())
    alpha = min(1.0, math.sqrt(PROBE_KL / estimated)) if estimated > 0 else 1.0

    @torch.no_grad()
    def swap_in():
        saved = [[p.detach().clone() for p in params] for params, _ in trials]
        for params, change in trials:
            for p, part in zip(params, change.split([p.shape[0] for p in params])):
                p.add_(part, alpha=alpha)

        @torch.no_grad()
        def restore():
            for (params, _), values in zip(trials, saved):
                for p, value in zip(params, values):
                    p.copy_(value)
        return restore

    measured = probe.kl_after_change(0, swap_in)
    scale = measured / (alpha**2 * estimated) if estimated > 0 and measured > 0 else 1.0
    coefficients = [{key: scale * kl / error if error > 0 else 0.0 for key, (kl, error) in layer.items()}
                    for layer in estimates]
    return coefficients, scale


def a3_curves(graph: ModelGraph, dense: DenseStatistics, components: frozenset[str], damping: float,
              qk_norm: tuple[float, str] | None) -> list[dict[str, Tensor]]:
    """Per layer, per component: the closed-form relative error at every rank (as the allocator computes it)."""
    paths = LINEAR_PATHS[graph.family]
    curves = []
    for index, layer in enumerate(graph.layers):
        with hold_layer(graph, index) as held:
            w_down = held.get_submodule(paths["down"]).weight.detach().T.clone()
            w_o = held.get_submodule(paths["o"]).weight.detach().clone()
        curves.append({c: relative_error_curve(layer, dense.a3[index], c, graph.uses_rope, damping, w_down=w_down,
                                               w_o=w_o, qk_norm=qk_norm) for c in COMPONENTS if c in components})
    return curves


def modelled_a3_loss(curves: list[dict[str, Tensor]], sensitivity: dict[str, list[float]],
                     probe_plans: list[LayerRanks], plans: list[LayerRanks]) -> float:
    """``Σ_ℓc max(s_ℓc, floor) · e_ℓc(r_ℓc) / e_ℓc(r_probe)``: the global allocator's objective (and its floor) at
    ``plans``; at the probe plan (uniform ranks) it is the sum of the probes."""
    values = sorted(abs(v) for c in sensitivity for v in sensitivity[c])
    floor = SENSITIVITY_FLOOR * max(values[len(values) // 2], 1e-12) if values else 0.0
    total = 0.0
    for layer_curves, probe, plan, index in zip(curves, probe_plans, plans, range(len(plans))):
        for component, curve in layer_curves.items():
            attr = {"qk": "qk", "ov": "vo", "mlp": "ff"}[component]
            at_probe = max(float(curve[getattr(probe, attr)]), 1e-12)
            total += max(sensitivity[component][index], floor) * float(curve[getattr(plan, attr)]) / at_probe
    if not math.isfinite(total):
        raise FloatingPointError("the modelled A³ loss is not finite (non-finite statistics?)")
    return total


def layer_dense_weights(graph: ModelGraph, index: int) -> dict[str, Tensor]:
    """Layer ``index``'s weights as ``compress_layer`` takes them (detached copies: the model stays as it is)."""
    with hold_layer(graph, index):
        return {key: value.detach().clone() for key, value in layer_weights(graph.model, graph.family, index).items()}
