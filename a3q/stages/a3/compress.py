"""Turn statistics and ranks into the smaller layer: the A³ closed forms applied to weights.

Every solution is an output-space transform (``q̃ = q a_q``), so a projection's HF weight
``[out, in]`` becomes ``aᵀ W`` and its bias ``aᵀ b``: biases are handled exactly, with no
augmented inputs. Weights are computed in float64 and cast back to the model dtype.

Within a head the weight rows are ordered as the compressed model expects: under RoPE the kept
pairs' first coordinates, then their partners (``pair_coordinates``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from a3q.graph import LayerStructure
from a3q.stages.a3.mlp import mlp_channel_scores, select_channels
from a3q.stages.a3.ov import ov_svd
from a3q.stages.a3.qk import pair_coordinates, qk_svd, rope_pair_scores, select_rope_pairs
from a3q.stages.a3.qk_norm import norm_rescale, qk_pair_scores, rescaled_norm_weight
from a3q.stages.a3.ranks import LayerRanks
from a3q.stages.a3.statistics import LayerStatistics

Weights = dict[str, Tensor]  # "q.weight", "q.bias", … for one layer, HF layout


@dataclass
class LayerResult:
    """The new weights of one layer, its new structure, and the relative error of each component."""

    weights: Weights
    structure: LayerStructure
    relative_error: dict[str, float]


def _rows(weights: Weights, name: str, transform: Tensor, start: int, size: int) -> tuple[Tensor, Tensor | None]:
    """``transformᵀ`` applied to rows ``[start, start+size)`` of a projection (and its bias)."""
    weight = weights[f"{name}.weight"][start : start + size].double()
    bias = weights.get(f"{name}.bias")
    new_bias = None if bias is None else transform.T @ bias[start : start + size].double()
    return transform.T @ weight, new_bias


def _gather_rows(weights: Weights, name: str, rows: Tensor) -> tuple[Tensor, Tensor | None]:
    bias = weights.get(f"{name}.bias")
    return weights[f"{name}.weight"][rows].double(), None if bias is None else bias[rows].double()


def _store(out: Weights, name: str, parts: list[tuple[Tensor, Tensor | None]], dtype: torch.dtype) -> None:
    out[f"{name}.weight"] = torch.cat([w for w, _ in parts]).to(dtype).contiguous()
    if parts[0][1] is not None:
        out[f"{name}.bias"] = torch.cat([b for _, b in parts]).to(dtype).contiguous()


def _compress_qk(weights, layer, stats, rank, rope, damping, out, dtype) -> tuple[list | None, float]:
    d, group = layer.qk_head_dim, layer.num_heads // layer.num_kv_heads
    q_parts, k_parts, kept_pairs, dropped, total = [], [], [], 0.0, 0.0
    for kv in range(layer.num_kv_heads):
        heads = range(kv * group, (kv + 1) * group)
        if rope:
            scores = rope_pair_scores(
                torch.stack([stats.g_q[h].diagonal() for h in heads]), stats.g_k[kv].diagonal()
            )
            local = select_rope_pairs(scores, rank)
            coords = pair_coordinates(local, d)
            current = layer.rope_pairs[kv] if layer.rope_pairs is not None else list(range(layer.head_dim // 2))
            kept_pairs.append([current[p] for p in local.tolist()])
            q_parts += [_gather_rows(weights, "q", h * d + coords) for h in heads]
            k_parts.append(_gather_rows(weights, "k", kv * d + coords))
            dropped, total = dropped + float(scores.sum() - scores[local].sum()), total + float(scores.sum())
        else:
            solution = qk_svd(stats.g_q[list(heads)], stats.g_k[kv], rank, damping)
            q_parts += [_rows(weights, "q", solution.a_q[j], h * d, d) for j, h in enumerate(heads)]
            k_parts.append(_rows(weights, "k", solution.a_k, kv * d, d))
            dropped += float(solution.dropped_energy(rank))
            total += float(solution.singular_values.square().sum())
    _store(out, "q", q_parts, dtype)
    _store(out, "k", k_parts, dtype)
    return (kept_pairs if rope else None), dropped / max(total, 1e-300)


def _compress_qk_normed(weights, layer, stats, rank, norm_offset, mode, out, dtype) -> tuple[list, float]:
    """QK with per-head q/k norms: one set of kept pairs for every KV group, norms over the kept coordinates with
    their gains rescaled (:mod:`a3q.stages.a3.qk_norm`)."""
    d, h, h_kv = layer.qk_head_dim, layer.num_heads, layer.num_kv_heads
    scores = qk_pair_scores(stats, layer, mode)
    local = select_rope_pairs(scores, rank)
    coords = pair_coordinates(local, d)
    current = layer.rope_pairs[0] if layer.rope_pairs is not None else list(range(layer.head_dim // 2))
    kept = [current[p] for p in local.tolist()]
    _store(out, "q", [_gather_rows(weights, "q", head * d + coords) for head in range(h)], dtype)
    _store(out, "k", [_gather_rows(weights, "k", kv * d + coords) for kv in range(h_kv)], dtype)
    for name, moments in (("q_norm", stats.g_q), ("k_norm", stats.g_k)):
        scale = norm_rescale(moments.diagonal(dim1=-2, dim2=-1), coords)
        out[f"{name}.weight"] = rescaled_norm_weight(weights[f"{name}.weight"], coords, scale, norm_offset).contiguous()
    dropped = float(scores.sum() - scores[local].sum())
    return [list(kept) for _ in range(h_kv)], dropped / max(float(scores.sum()), 1e-300)


def _compress_ov(weights, layer, stats, rank, damping, out, dtype) -> float:
    d, group = layer.vo_head_dim, layer.num_heads // layer.num_kv_heads
    mha = group == 1
    o_weight = weights["o.weight"].double()
    v_parts, o_blocks, dropped, total = [], [], 0.0, 0.0
    for kv in range(layer.num_kv_heads):
        heads = list(range(kv * group, (kv + 1) * group))
        moment = stats.g_o[kv] if mha else stats.g_v[kv]
        w_o = torch.stack([o_weight[:, h * d : (h + 1) * d].T for h in heads])
        solution = ov_svd(moment, w_o, rank, damping)
        v_parts.append(_rows(weights, "v", solution.a_v, kv * d, d))
        o_blocks += [solution.b_o[j].T for j in range(len(heads))]
        dropped += float(solution.dropped_energy(rank))
        total += float(solution.singular_values.square().sum())
    _store(out, "v", v_parts, dtype)
    out["o.weight"] = torch.cat(o_blocks, dim=1).to(dtype).contiguous()
    if "o.bias" in weights:
        out["o.bias"] = weights["o.bias"]
    return dropped / max(total, 1e-300)


def _compress_mlp(weights, layer, stats, rank, out, dtype) -> float:
    down = weights["down.weight"].double()
    scores = mlp_channel_scores(stats.mlp_x2, down.T)
    channels = select_channels(scores, rank)
    for name in ("gate", "up"):
        if f"{name}.weight" in weights:
            _store(out, name, [_gather_rows(weights, name, channels)], dtype)
    out["down.weight"] = down[:, channels].to(dtype).contiguous()
    if "down.bias" in weights:
        out["down.bias"] = weights["down.bias"]
    return float(1 - scores[channels].sum() / scores.sum().clamp_min(1e-300))


def compress_layer(
    weights: Weights,
    layer: LayerStructure,
    stats: LayerStatistics,
    ranks: LayerRanks,
    rope: bool,
    damping: float,
    components: frozenset[str] = frozenset({"qk", "ov", "mlp"}),
    qk_norm: tuple[float, str] | None = None,
) -> LayerResult:
    """Apply A³ to the enabled ``components`` of one layer; the others are left untouched.

    ``qk_norm`` is ``(gain offset, mode)`` for families with per-head q/k norms (``weights`` then also holds
    ``q_norm.weight`` and ``k_norm.weight``); see :mod:`a3q.stages.a3.qk_norm`.

    An enabled component is transformed even at full rank (a change of basis for OV/NoPE-QK):
    that is what lets the full-rank test check the whole path against the dense logits.
    """
    dtype = weights["q.weight"].dtype
    out: Weights = dict(weights)
    structure = replace(layer)
    errors: dict[str, float] = {}
    if "qk" in components and qk_norm is not None:
        pairs, errors["qk"] = _compress_qk_normed(weights, layer, stats, ranks.qk, *qk_norm, out, dtype)
        structure = replace(structure, qk_head_dim=ranks.qk, rope_pairs=pairs)
    elif "qk" in components:
        pairs, errors["qk"] = _compress_qk(weights, layer, stats, ranks.qk, rope, damping, out, dtype)
        structure = replace(structure, qk_head_dim=ranks.qk, rope_pairs=pairs)
    if "ov" in components:
        errors["ov"] = _compress_ov(weights, layer, stats, ranks.vo, damping, out, dtype)
        structure = replace(structure, vo_head_dim=ranks.vo)
    if "mlp" in components:
        errors["mlp"] = _compress_mlp(weights, layer, stats, ranks.ff, out, dtype)
        structure = replace(structure, intermediate_size=ranks.ff)
    return LayerResult(weights=out, structure=structure, relative_error=errors)
