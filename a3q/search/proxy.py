"""The search's proxy: every candidate's estimated KL (nats per token) from one pass and a few hundred probes.

``collect_proxy_statistics`` does all the work once for a whole space; ``proxy_score`` reads it:

1. one layer-by-layer pass over the calibration windows on the dense model collects the A³ moments and one Hessian
   per input group (:mod:`a3q.search.statistics`);
2. KL probes fix each term's scale (:mod:`a3q.search.probes`): A³'s own probes (once per distinct ratio, or once
   for the space); for the weight quantizers one backward for the output Fisher of every linear
   (:mod:`a3q.search.fisher`, over the first ``fisher_windows`` windows) and, per quantizer, one probe of its errors
   in every layer at once;
3. per distinct (A³ ratio, allocation): the ranks the ``a3`` stage would choose and their modelled loss;
4. per distinct (A³ ratio, allocation, quantizer): the quantizer run on every group's weights — the compressed
   ones after A³, against the Hessians of the inputs A³ leaves (:mod:`a3q.search.weight_error`) — and its
   relative errors weighted by the probes.

**How the terms combine.** ``score = A³ loss + Σ_ℓg k_ℓg · err_ℓg + KV loss``. The A³ and KV terms are the
allocator's modelled KL; the weight term is not the dense model's quantization loss added on: it quantizes the
weights the candidate will really hold, against the inputs they will really see (on the dense stream), so the
interaction (bits cost more after A³) is in ``err``. Only the KL scales ``k`` and ``s`` are measured on the dense
model, and the terms are added: second-order effects of small, unrelated perturbations add to first order.

**KV** (``kv`` stage): rank reduction is A³'s QK/OV at the kv stage's ranks (:func:`a3q.stages.kv.plan_kv_ranks`
applied to the sizes A³ leaves), modelled like A³ on the dense model's curves: with the candidate's A³ probes when it
has an ``a3`` stage, else with probes at the kv ranks. A quantized cache (``bits``) is **not modelled** (scored 0):
its error depends on activation outliers this pass does not keep, so the search must measure it (the real evaluation
of the front's candidates does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from a3q.arch import FAMILIES
from a3q.arch.surgery import as_a3_graph
from a3q.graph import ModelGraph
from a3q.pipeline.runner import LayerProbe
from a3q.search.candidate import Candidate
from a3q.search.fisher import output_fisher
from a3q.search.probes import a3_curves, layer_dense_weights, modelled_a3_loss, weight_sensitivity
from a3q.search.statistics import DenseStatistics, collect_dense_statistics
from a3q.search.weight_error import compressed_hessians, quantization_error, stage_config
from a3q.stages.a3.allocation import plan_global_ranks
from a3q.stages.a3.apply import qk_norm_setting
from a3q.stages.a3.compress import compress_layer
from a3q.stages.a3.ranks import LayerRanks, plan_ranks
from a3q.stages.a3.sensitivity import measure_sensitivity
from a3q.stages.a3.stage import A3Config
from a3q.stages.kv import KVConfig, plan_kv_ranks

Fields = tuple[tuple[str, Any], ...]


@dataclass
class ProxyScore:
    """One candidate's estimate, by term, with the ranks A³ and the kv stage would choose."""

    a3: float = 0.0
    weights: float = 0.0
    kv: float = 0.0
    ranks: list[LayerRanks] | None = None

    @property
    def total(self) -> float:
        return self.a3 + self.weights + self.kv


@dataclass
class ProxyStatistics:
    """Everything the proxy measured once for a space, and each candidate's score."""

    dense: DenseStatistics
    sensitivity: dict[tuple, dict[str, list[float]]] = field(default_factory=dict)  # (ratio, qk_norm) → A³ probes
    plans: dict[tuple[float, str], list[LayerRanks]] = field(default_factory=dict)  # (ratio, allocation) → ranks
    #: per quantizer: KL per unit relative error, per layer and group
    weight_kl: dict[Fields, list[dict[str, float]]] = field(default_factory=dict)
    #: per quantizer: its probe's measured KL / the Fisher's estimate (1: the Fisher exact)
    fisher_scale: dict[Fields, float] = field(default_factory=dict)
    weight_errors: dict[tuple, list[dict[str, float]]] = field(default_factory=dict)  # (ratio, allocation, weights)
    scores: dict[Candidate, ProxyScore] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class _Collector:
    """The steps of :func:`collect_proxy_statistics`, sharing the graph, the probe and the caches."""

    def __init__(self, graph: ModelGraph, windows: Tensor, stats: ProxyStatistics, progress: bool, a3_probes: str,
                 reference_ratio: float | None, row_stride: int) -> None:
        self.graph, self.windows, self.stats, self.progress = graph, windows, stats, progress
        self.a3_probes, self.reference_ratio, self.row_stride = a3_probes, reference_ratio, row_stride
        self._probe: LayerProbe | None = None
        self._curves: dict[tuple, list[dict[str, Tensor]]] = {}
        self._weights: list[dict[str, Tensor]] | None = None

    def probe(self) -> LayerProbe:
        defaults = A3Config(ratio=0.1)  # the stage's probe windows, so its probes and the search's are the same
        if self._probe is None:
            self._probe = LayerProbe(self.graph, self.windows[: defaults.probe_windows, : defaults.probe_seq_len])
        return self._probe

    def a3_setting(self, ratio: float, allocation: str) -> tuple[A3Config, dict, frozenset[str], Any]:
        config = A3Config(ratio=ratio, allocation=allocation)
        ratios, components = config.component_ratios(), frozenset(config.components)
        if FAMILIES[self.graph.family].qk_norm_paths is not None and config.qk_norm == "keep":
            ratios["qk"], components = None, components - {"qk"}
        return config, ratios, components, qk_norm_setting(self.graph, config.qk_norm)

    def sensitivity(self, key: tuple, probe_plans: list[LayerRanks], components: frozenset[str], damping: float,
                    qk_norm: Any) -> dict[str, list[float]]:
        if key not in self.stats.sensitivity:
            self.stats.sensitivity[key] = measure_sensitivity(self.graph, self.stats.dense.a3, probe_plans,
                                                              self.probe(), components, damping, self.progress,
                                                              qk_norm)
        return self.stats.sensitivity[key]

    def curves(self, mode: str, components: frozenset[str], damping: float, qk_norm: Any) -> list[dict[str, Tensor]]:
        key = (mode, components, damping)
        if key not in self._curves:
            self._curves[key] = a3_curves(self.graph, self.stats.dense, components, damping, qk_norm)
        return self._curves[key]

    def probes_for(self, ratio: float, allocation: str) -> tuple[dict[str, list[float]], list[LayerRanks]]:
        """The A³ probes that model ``ratio``'s losses, and the ranks they were taken at: ``ratio``'s own (``each``,
        exactly the a3 stage's) or the space's reference ratio's (``once``; see :func:`collect_proxy_statistics`)."""
        probe_ratio = ratio if self.a3_probes == "each" or self.reference_ratio is None else self.reference_ratio
        config, ratios, components, qk_norm = self.a3_setting(probe_ratio, allocation)
        plans = plan_ranks(self.graph.layers, ratios, {}, config.rank_multiple, self.graph.uses_rope)
        return self.sensitivity((probe_ratio, config.qk_norm), plans, components, config.damping, qk_norm), plans

    def a3(self, candidate: Candidate) -> tuple[float, list[LayerRanks]]:
        """The ranks the a3 stage would choose for ``candidate`` and their modelled loss."""
        config, ratios, components, qk_norm = self.a3_setting(candidate.a3_ratio, candidate.allocation)
        uniform = plan_ranks(self.graph.layers, ratios, {}, config.rank_multiple, self.graph.uses_rope)
        sensitivity, probe_plans = self.probes_for(candidate.a3_ratio, candidate.allocation)
        curves = self.curves(config.qk_norm, components, config.damping, qk_norm)
        key = (candidate.a3_ratio, candidate.allocation)
        if key not in self.stats.plans:
            own = rescaled(sensitivity, curves, probe_plans, uniform)  # = sensitivity when probed at this ratio
            self.stats.plans[key] = uniform if candidate.allocation == "uniform" else plan_global_ranks(
                self.graph, self.stats.dense.a3, ratios, self.probe(), config.rank_multiple, config.damping,
                config.max_shift, config.mix_components, self.progress, sensitivity=own, qk_norm=qk_norm).plans
        return modelled_a3_loss(curves, sensitivity, probe_plans, self.stats.plans[key]), self.stats.plans[key]

    def weight_errors(self, candidate: Candidate, plans: list[LayerRanks] | None) -> list[dict[str, float]]:
        """Relative error of the candidate's quantizer on every group, after its A³ (cached per A³ setting)."""
        key = (candidate.a3_ratio, candidate.allocation if candidate.a3_ratio > 0 else None, candidate.weights)
        if key in self.stats.weight_errors:
            return self.stats.weight_errors[key]
        if self._weights is None:
            self._weights = [layer_dense_weights(self.graph, i) for i in range(len(self.graph.layers))]
        dense, errors = self.stats.dense, []
        for index in tqdm(range(len(self.graph.layers)), desc=f"quantize {candidate.key}", disable=not self.progress,
                          leave=False):
            weights, hessians = self._weights[index], dense.hessians[index]
            if plans is not None:
                config, _, components, qk_norm = self.a3_setting(candidate.a3_ratio, candidate.allocation)
                layer, stats = self.graph.layers[index], dense.a3[index]
                hessians = compressed_hessians(hessians, dense.groups[index], layer, stats, weights, plans[index],
                                               config.damping, components)
                weights = compress_layer(weights, layer, stats, plans[index], self.graph.uses_rope, config.damping,
                                         components, qk_norm).weights
            errors.append({group: quantization_error(
                _stacked(weights, members), hessians[group], candidate.weights, self.row_stride)
                for group, members in dense.groups[index].items()})
        self.stats.weight_errors[key] = errors
        return errors

    def kv(self, candidate: Candidate, plans: list[LayerRanks] | None) -> tuple[float, list[LayerRanks] | None]:
        """The kv stage's modelled loss (ranks only: see the module docstring) and the ranks it leaves."""
        config = KVConfig(**{k: v for k, v in candidate.kv if k != "stage"})
        if not config.reduces_ranks():
            return 0.0, plans
        before = plans or [LayerRanks(layer.qk_head_dim, layer.vo_head_dim, layer.intermediate_size)
                           for layer in self.graph.layers]
        sizes = [replace(layer, qk_head_dim=p.qk, vo_head_dim=p.vo) for layer, p in zip(self.graph.layers, before)]
        after = [LayerRanks(k.qk, k.vo, p.ff) for k, p in zip(
            plan_kv_ranks(SimpleNamespace(layers=sizes, uses_rope=self.graph.uses_rope), config), before)]
        a3_config, _, components, qk_norm = self.a3_setting(candidate.a3_ratio or 0.1, candidate.allocation)
        components = components & {"qk", "ov"}
        if candidate.a3_ratio > 0 or (self.a3_probes == "once" and self.reference_ratio is not None):
            sensitivity, probe_plans = self.probes_for(candidate.a3_ratio or self.reference_ratio, candidate.allocation)
        else:  # probes at the kv ranks themselves
            key = ("kv", a3_config.qk_norm, tuple((p.qk, p.vo) for p in after))
            sensitivity, probe_plans = self.sensitivity(key, after, components, config.damping, qk_norm), after
        curves = self.curves(a3_config.qk_norm, components, a3_config.damping, qk_norm)
        loss = modelled_a3_loss(curves, sensitivity, probe_plans, after) - modelled_a3_loss(
            curves, sensitivity, probe_plans, before)
        return max(loss, 0.0), after


def rescaled(sensitivity: dict[str, list[float]], curves: list[dict[str, Tensor]], probed: list[LayerRanks],
             target: list[LayerRanks]) -> dict[str, list[float]]:
    """Probes taken at ranks ``probed`` moved to ranks ``target`` by the allocator's own loss model,
    ``s' = s · e(r_target) / e(r_probed)``: the curves it builds from ``s'`` at ``target`` are those it would build
    from ``s`` at ``probed``. Identity when ``probed == target``."""
    attr = {"qk": "qk", "ov": "vo", "mlp": "ff"}
    out = {}
    for component, values in sensitivity.items():
        out[component] = []
        for index, value in enumerate(values):
            before, after = getattr(probed[index], attr[component]), getattr(target[index], attr[component])
            curve = curves[index].get(component)
            factor = 1.0 if before == after or curve is None else float(curve[after]) / max(float(curve[before]), 1e-12)
            out[component].append(value * factor)
    return out


def _stacked(weights: dict[str, Tensor], members: tuple[str, ...]) -> Tensor:
    return torch.cat([weights[f"{short}.weight"] for short in members])


def collect_proxy_statistics(graph: ModelGraph, windows: Tensor, candidates: list[Candidate],
                             progress: bool = True, fisher_windows: int = 4,
                             a3_probes: Literal["once", "each"] = "once", row_stride: int = 4) -> ProxyStatistics:
    """Everything ``proxy_score`` needs for ``candidates``, from ONE pass over ``windows`` (see the module
    docstring). ``graph`` is left as it is (an A³ space works on a converted copy, as the a3 stage converts).

    ``a3_probes``: ``each`` probes every distinct A³ ratio as the a3 stage would (its ranks and probes exactly, 90
    probes per ratio on SmolLM2); ``once`` probes only the space's middle ratio and models the others with the
    allocator's own curves, ``s(r) = s(r_probe) · e(r) / e(r_probe)``, exact under the allocator's loss model; the
    global ranks can then differ from the stage's where that model and the real probes disagree.
    ``row_stride``: GPTQ's error from every ``row_stride``-th output row (:func:`quantization_error`; 1: every row).
    """
    if not candidates:
        raise ValueError("candidates: nothing to score (an empty space)")
    if a3_probes not in ("once", "each"):
        raise ValueError(f"a3_probes: once or each, got {a3_probes!r}")
    if row_stride < 1:
        raise ValueError(f"row_stride: at least 1, got {row_stride}")
    for candidate in candidates:
        if candidate.weights is not None:
            stage_config(candidate.weights)
        if candidate.kv is not None:
            KVConfig(**{k: v for k, v in candidate.kv if k != "stage"})
    reduces_kv = any(c.kv is not None and KVConfig(**{k: v for k, v in c.kv if k != "stage"}).reduces_ranks()
                     for c in candidates)
    if any(c.a3_ratio > 0 for c in candidates) or reduces_kv:
        graph = as_a3_graph(graph)  # a copy of the weights in a3q's class (same logits), as the a3 and kv stages do
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    stats = ProxyStatistics(dense=collect_dense_statistics(graph, windows, progress=progress))
    seconds["pass"] = time.perf_counter() - started
    ratios = sorted({c.a3_ratio for c in candidates if c.a3_ratio > 0})
    collector = _Collector(graph, windows, stats, progress, a3_probes, ratios[len(ratios) // 2] if ratios else None,
                           row_stride)
    quantizers = sorted({c.weights for c in candidates if c.weights is not None}, key=str)
    if quantizers:
        started = time.perf_counter()
        fisher = output_fisher(graph, windows[:fisher_windows], stats.dense.groups)
        seconds["fisher"] = time.perf_counter() - started
        for fields in quantizers:
            started = time.perf_counter()
            stats.weight_kl[fields], stats.fisher_scale[fields] = weight_sensitivity(
                graph, stats.dense, fisher, collector.probe(), fields, progress)
            seconds[f"weight sensitivity {dict(fields)}"] = time.perf_counter() - started
    for candidate in tqdm(candidates, desc="proxy scores", disable=not progress, leave=False):
        started = time.perf_counter()
        score = ProxyScore()
        if candidate.a3_ratio > 0:
            score.a3, score.ranks = collector.a3(candidate)
        if candidate.weights is not None:
            errors = collector.weight_errors(candidate, score.ranks)
            k = stats.weight_kl[candidate.weights]
            score.weights = sum(k[i][g] * e for i, layer in enumerate(errors) for g, e in layer.items())
        if candidate.kv is not None:
            score.kv, score.ranks = collector.kv(candidate, score.ranks)
        stats.scores[candidate] = score
        seconds[candidate.key] = time.perf_counter() - started
    stats.seconds = seconds
    return stats


def proxy_score(stats: ProxyStatistics, candidate: Candidate) -> float:
    """The candidate's estimated KL to the dense model, nats per token (lower is better; the dense model: 0)."""
    if candidate not in stats.scores:
        raise KeyError(f"candidate {candidate.key}: not among the candidates its statistics were collected for")
    return stats.scores[candidate].total
