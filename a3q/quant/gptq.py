"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's error onto the
columns not yet quantized through the inverse Hessian of the layer-wise objective ``‖X Wᵀ − X Qᵀ‖²``.

``H = 2 E[x xᵀ]`` comes from the linear's inputs on calibration data (:class:`HessianAccumulator`). The inverse
is taken once by Cholesky (after damping ``damp_percent · mean(diag H)``), and its upper Cholesky factor drives
the updates: inside a block of columns one rank-1 update per column, after the block one matrix product for
everything to its right (the "lazy batch" update that makes GPTQ fast).

Groups: every ``group_size`` consecutive columns (in quantization order) share a scale and zero per output row,
found from the columns' current (already error-corrected) values when the group starts. A last group shorter
than ``group_size`` is allowed. With ``act_order`` columns are processed by decreasing ``diag H``; ``g_idx``
records each original input's group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


class HessianAccumulator:
    """Running ``2 E[x xᵀ]`` of a linear's inputs (one per distinct input, fed by a forward pre-hook).

    Each batch's product is taken in float32 (float64 inputs stay float64) and summed in float64: the batch
    products are where the time goes (``tokens · in²``), the sum is where precision is lost.
    """

    def __init__(self, in_features: int) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.tokens = 0

    def add(self, inputs: Tensor) -> None:
        flat = inputs.detach().reshape(-1, inputs.shape[-1])
        flat = flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32)
        self.sum += (flat.t() @ flat).to(torch.float64).cpu()
        self.tokens += flat.shape[0]

    def hessian(self) -> Tensor:
        return 2 * self.sum / max(self.tokens, 1)


@dataclass
class QuantizedWeight:
    """Integer codes ``[out, in]``, per-group ``scales``/``zeros [groups, out]``, ``g_idx [in]``, and the error."""

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    #: ``tr((W − Q) H (W − Q)ᵀ) / tr(W H Wᵀ)``: the layer-wise objective GPTQ minimises, relative
    relative_error: float


def group_parameters(columns: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale (fp16-representable) and integer zero point per row for the given ``[out, k]`` columns.

    The range always includes 0 (so a zero weight stays exact). Zero points are kept ≥ 1 because the GPTQ v1
    layout stores them minus one.
    """
    maxq = 2**bits - 1
    low = columns.min(dim=1).values.clamp(max=0)
    high = columns.max(dim=1).values.clamp(min=0)
    if sym:
        high = torch.maximum(low.abs(), high)
        low = -high
    empty = (low == 0) & (high == 0)
    low, high = torch.where(empty, -1.0, low), torch.where(empty, 1.0, high)
    scale = ((high - low) / maxq).to(torch.float16).to(columns.dtype)
    scale = torch.where(scale == 0, torch.finfo(torch.float16).tiny, scale)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-low / scale).clamp(1, maxq)
    return scale, zero


def quantize_columns(columns: Tensor, scale: Tensor, zero: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Codes and dequantised values of ``columns [out, k]`` under per-row ``scale``/``zero``."""
    codes = torch.clamp(torch.round(columns / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
    return codes, scale[:, None] * (codes - zero[:, None])


@torch.no_grad()
def gptq_quantize(
    weight: Tensor, hessian: Tensor, bits: int, group_size: int = -1, sym: bool = True,
    act_order: bool = False, damp_percent: float = 0.01, block_size: int = 128,
) -> QuantizedWeight:
    """Quantize ``weight [out, in]`` given its input Hessian ``[in, in]``; see the module docstring."""
    out_features, in_features = weight.shape
    group = group_size if group_size > 0 else in_features
    if group_size > 0:  # groups must not straddle blocks: their parameters come from up-to-date columns
        block_size = max(group, block_size // group * group)
    # float32 work (float64 for float64 input, as the brute-force tests use); the Hessian is inverted in float64.
    # Columns of W are rows of Wt, so every per-column step touches contiguous memory.
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    Wt = weight.detach().to(work).t().contiguous()  # [in, out]
    H = hessian.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Wt[dead] = 0
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_features)
    Wt, H = Wt[order], H[order][:, order]
    H_original = H.clone()
    H += damp_percent * torch.mean(torch.diag(H)) * torch.eye(in_features, dtype=H.dtype)
    H_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).to(work)

    codes = torch.zeros_like(Wt)
    Qt = torch.zeros_like(Wt)
    groups = math.ceil(in_features / group)
    scales = torch.zeros(groups, out_features, dtype=work)
    zeros = torch.zeros(groups, out_features, dtype=work)
    if group_size <= 0:  # one group: its parameters come from the whole (uncorrected) row, as in the paper
        scales[0], zeros[0] = group_parameters(Wt.t(), bits, sym)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block, block_inv = Wt[start:end].clone(), H_inv[start:end, start:end]
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column = start + i
            g = column // group
            if group_size > 0 and column % group == 0:
                scales[g], zeros[g] = group_parameters(block[i : i + group].t(), bits, sym)
            code, value = quantize_columns(block[i : i + 1].t(), scales[g], zeros[g], bits)
            codes[column], Qt[column] = code[:, 0], value[:, 0]
            error = (block[i] - value[:, 0]) / block_inv[i, i]
            block[i:] -= block_inv[i, i:, None] * error[None, :]
            errors[i] = error
        Wt[end:] -= H_inv[start:end, end:].t() @ errors

    original = weight.detach().to(torch.float64)[:, order]
    difference = original - Qt.t().to(torch.float64)
    residual = ((difference @ H_original) * difference).sum()
    reference = ((original @ H_original) * original).sum()
    inverse = torch.argsort(order)
    g_idx = (torch.arange(in_features) // group)[inverse]
    return QuantizedWeight(
        codes=codes.t()[:, inverse].to(torch.int32),
        scales=scales.to(torch.float16),
        zeros=zeros.to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        relative_error=float(residual / reference.clamp_min(1e-30)),
    )
