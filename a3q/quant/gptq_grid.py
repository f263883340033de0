"""GPTQ's quantization grid: a group's scale and zero point per output row, and quantizing columns onto it.

Split from :mod:`a3q.quant.gptq` (which re-exports both functions). ``mse`` (issue 32) searches the clipping range
per row instead of taking min/max: GPTQ's own reference quantizer (and GPTQModel's ``mse``) shrink the range by
factors 1.00, 0.99, …, 0.80 and keep, per row, the one whose round-trip error ``Σ|w − q(w)|^2.4`` is smallest. With
4 bits a single outlier otherwise stretches every step of its group; clipping it costs that one weight more than it
saves on the others only when the search says so (factor 1.0, min/max, is always a candidate, so the search never
does worse on that error).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: range factors the ``mse`` search tries (1.0 first: ties keep min/max)
SHRINKS = tuple(round(1.0 - 0.01 * step, 2) for step in range(21))
#: the error norm of the search (GPTQ's reference quantizer's choice)
NORM = 2.4


def _range_parameters(low: Tensor, high: Tensor, maxq: int, sym: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    scale = ((high - low) / maxq).to(torch.float16).to(dtype)
    scale = torch.where(scale == 0, torch.finfo(torch.float16).tiny, scale)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-low / scale).clamp(1, maxq)
    return scale, zero


def group_parameters(columns: Tensor, bits: int, sym: bool, mse: bool = False) -> tuple[Tensor, Tensor]:
    """Scale (fp16-representable) and integer zero point per row for the given ``[out, k]`` columns.

    The range always includes 0 (so a zero weight stays exact). Zero points are kept ≥ 1 because the GPTQ v1
    layout stores them minus one. ``mse``: the clipping search of the module docstring.
    """
    maxq = 2**bits - 1
    low = columns.min(dim=1).values.clamp(max=0)
    high = columns.max(dim=1).values.clamp(min=0)
    if sym:
        high = torch.maximum(low.abs(), high)
        low = -high
    empty = (low == 0) & (high == 0)
    low, high = torch.where(empty, -1.0, low), torch.where(empty, 1.0, high)
    scale, zero = _range_parameters(low, high, maxq, sym, columns.dtype)
    if not mse:
        return scale, zero
    best = _error(columns, scale, zero, bits)
    for shrink in SHRINKS[1:]:
        candidate_scale, candidate_zero = _range_parameters(low * shrink, high * shrink, maxq, sym, columns.dtype)
        error = _error(columns, candidate_scale, candidate_zero, bits)
        better = error < best
        scale, zero = torch.where(better, candidate_scale, scale), torch.where(better, candidate_zero, zero)
        best = torch.where(better, error, best)
    return scale, zero


def _error(columns: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    return (columns - quantize_columns(columns, scale, zero, bits)[1]).abs().pow(NORM).sum(dim=1)


def quantize_columns(columns: Tensor, scale: Tensor, zero: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Codes and dequantised values of ``columns [out, k]`` under per-row ``scale``/``zero``."""
    codes = torch.clamp(torch.round(columns / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
    return codes, scale[:, None] * (codes - zero[:, None])
