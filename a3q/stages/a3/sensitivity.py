"""Measured sensitivity for global allocation: the KL each (layer, component) causes alone at its probe rank.

It fixes each error curve's scale in loss units (see :mod:`a3q.stages.a3.allocation`). Probes run on the pipeline's
cached layer inputs (:class:`~a3q.pipeline.runner.LayerProbe`), so a probe costs the layers after the one probed.
"""

from __future__ import annotations

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
from a3q.stages.a3.qk import pair_coordinates, rope_pair_scores, select_rope_pairs
from a3q.stages.a3.qk_norm import qk_pair_scores, zero_padded_trial
from a3q.stages.a3.ranks import COMPONENTS, LayerRanks
from a3q.stages.a3.statistics import LayerStatistics


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
