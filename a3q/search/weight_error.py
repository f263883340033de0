"""What a weight quantizer costs one group of linears, on dense or A³-compressed weights, from the shared Hessians.

**The quantized weight** is what the stage would store: GPTQ's codes from :func:`a3q.quant.gptq.gptq_quantize` with
the stage's own settings (its config's defaults filled in), dequantized with the float16 scales the artifact keeps;
bitsandbytes' round trip through :func:`a3q.quant.bnb.quantize_linear` and :func:`a3q.quant.bnb.dequantize`.
**The error** is GPTQ's objective relative to the group's output energy,
``tr((W − Q) H (W − Q)ᵀ) / tr(W H Wᵀ)`` (:func:`a3q.quant.gptq.weighted_relative_error`).

**After A³** the quantizer sees the compressed weights, and some inputs change with them. Every A³ solution is an
output-space transform, so on the dense stream (attention probabilities and the residual stream as the dense model
has them: the A³ stage's own protocol) the new inputs are linear maps of the old ones and their Hessian is exact:

* q/k/v and gate/up read the layer's (normed) hidden states, which A³ does not touch: ``H`` unchanged;
* o_proj reads each query head's attention output, whose value head A³ maps by ``v ↦ v a_v`` (``a_v`` per KV group,
  :func:`a3q.stages.a3.ov.ov_svd`): ``H_o' = Bᵀ H_o B`` with ``B`` block-diagonal, head h's block ``a_v`` of its group;
* down_proj reads the kept intermediate channels: ``H_down' = H_down[kept, kept]``.

Quantizing the compressed weights against these Hessians is what GPTQ after A³ does, up to the sequential stream
(see :mod:`a3q.search.statistics`); it captures why bits cost more after A³ (fewer, larger-energy directions),
which an additive "A³ loss + dense quantization loss" would miss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from a3q.graph import LayerStructure
from a3q.quant import bnb as bnb_format
from a3q.quant.gptq import gptq_quantize, weighted_relative_error
from a3q.registry import get_stage
from a3q.stages.a3.mlp import mlp_channel_scores, select_channels
from a3q.stages.a3.ov import ov_svd
from a3q.stages.a3.ranks import LayerRanks
from a3q.stages.a3.statistics import LayerStatistics

WEIGHT_STAGES = ("gptq", "bnb")


def stage_config(fields: tuple[tuple[str, Any], ...] | dict[str, Any]) -> tuple[str, Any]:
    """A candidate's stage fields → ``(stage name, its validated config)``, with a recipe's defaults filled in."""
    fields = dict(fields)
    name = fields.pop("stage", None)
    if name not in WEIGHT_STAGES:
        raise ValueError(f"weights.stage: the proxy models {', '.join(WEIGHT_STAGES)}, got {name!r}")
    return name, get_stage(name).config_class(**fields)


@torch.no_grad()
def quantized_weight(weight: Tensor, hessian: Tensor, fields: tuple[tuple[str, Any], ...]) -> Tensor:
    """The float weight ``[out, in]`` the stage would store for ``weight`` (one input group, stacked)."""
    name, config = stage_config(fields)
    if name == "gptq":
        result = gptq_quantize(weight, hessian, config.bits, config.group_size, config.sym, config.act_order,
                               config.damp_percent, config.block_size, act_group_aware=config.act_group_aware,
                               damp_auto=config.damp_auto, mse=config.mse)
        g = result.g_idx.long()
        scales = result.scales.to(torch.float32)[g].t()  # as stored: float16 scales
        return (scales * (result.codes - result.zeros[g].t()).to(torch.float32)).to(weight.dtype)
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight.copy_(weight)
    module = bnb_format.quantize_linear(linear, config.quant_type, config.double_quant, config.compute_dtype,
                                        config.blocksize, config.threshold)
    return bnb_format.dequantize(module, weight.dtype)


def quantization_error(weight: Tensor, hessian: Tensor, fields: tuple[tuple[str, Any], ...], row_stride: int = 1
                       ) -> float:
    """The relative H-weighted error of quantizing ``weight`` with the stage ``fields`` describe.

    ``row_stride`` > 1 (GPTQ only): quantize a sample of the output rows. GPTQ quantizes rows independently given H
    (scales, zeros and error feedback are per row), so a sampled row's codes are exactly the full run's (tested); the
    error is then estimated, never a sampled ratio: the rows with the most output energy ``W_j H W_jᵀ`` (the top
    ``1/(4·row_stride)``) are always quantized and counted exactly, every ``row_stride``-th of the others is
    quantized and counted for its stride, over the energy of every row. Why: SmolLM2's residual-stream outlier
    channels put most of a group's energy in a few rows, and a plain ratio over every 4th row was off by up to 5×.
    bitsandbytes (cheap, and its blocks and nested scales span rows) always quantizes every row.
    """
    if row_stride <= 1 or dict(fields).get("stage") != "gptq":
        return weighted_relative_error(weight, quantized_weight(weight, hessian, fields), hessian)
    work = weight.double()
    H = hessian.to(device=weight.device, dtype=torch.float64)
    energy = ((work @ H) * work).sum(1)
    order = energy.argsort(descending=True)
    top = max(1, weight.shape[0] // (4 * row_stride))
    rest = order[top:].sort().values
    sampled = rest[::row_stride]
    rows = torch.cat([order[:top], sampled])
    delta = work[rows] - quantized_weight(weight[rows], hessian, fields).double()
    residual = ((delta @ H) * delta).sum(1)
    estimate = residual[:top].sum() + residual[top:].sum() * (rest.numel() / max(sampled.numel(), 1))
    total = float(energy.sum())
    return float(estimate) / total if total > 0 else 0.0


def o_input_map(layer: LayerStructure, stats: LayerStatistics, w_o: Tensor, vo_rank: int, damping: float) -> Tensor:
    """``B [h·d, h·r]``: o_proj's new input (every head's output after A³'s OV) as a map of its dense input, built
    from the same :func:`ov_svd` solutions ``compress_layer`` uses."""
    d, group = layer.vo_head_dim, layer.num_heads // layer.num_kv_heads
    blocks = []
    for kv in range(layer.num_kv_heads):
        heads = list(range(kv * group, (kv + 1) * group))
        moment = stats.g_o[kv] if group == 1 else stats.g_v[kv]
        slices = torch.stack([w_o[:, h * d : (h + 1) * d].T.double() for h in heads])
        a_v = ov_svd(moment, slices, vo_rank, damping).a_v
        blocks += [a_v] * group
    return torch.block_diag(*blocks)


def kept_channels(stats: LayerStatistics, w_down: Tensor, ff_rank: int) -> Tensor:
    """The intermediate channels A³'s MLP keeps (the same selection ``compress_layer`` makes)."""
    return select_channels(mlp_channel_scores(stats.mlp_x2, w_down.double().T), ff_rank)


def compressed_hessians(hessians: dict[str, Tensor], groups: dict[str, tuple[str, ...]], layer: LayerStructure,
                        stats: LayerStatistics, dense: dict[str, Tensor], ranks: LayerRanks, damping: float,
                        components: frozenset[str]) -> dict[str, Tensor]:
    """Each group's Hessian on the inputs A³ (at ``ranks``, with ``components``) leaves; see the module docstring."""
    out = dict(hessians)
    for key, members in groups.items():
        if "o" in members and "ov" in components:
            B = o_input_map(layer, stats, dense["o.weight"], ranks.vo, damping).to(hessians[key].device)
            out[key] = B.T @ hessians[key] @ B
        elif "down" in members and "mlp" in components:
            channels = kept_channels(stats, dense["down.weight"], ranks.ff).to(hessians[key].device)
            out[key] = hessians[key][channels][:, channels]
    return out
