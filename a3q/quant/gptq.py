"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's error onto the
columns not yet quantized through the inverse Hessian of the layer-wise objective ``‖X Wᵀ − X Qᵀ‖²``.

``H = 2 E[x xᵀ]`` comes from the linear's inputs on calibration data (:class:`HessianAccumulator`). The inverse
is taken once by Cholesky (after damping ``damp_percent · mean(diag H)``; with ``damp_auto`` the damping is
doubled until the factorisation succeeds, and the value used is returned), and its upper Cholesky factor drives
the updates: inside a block of columns one rank-1 update per column, after the block one matrix product for
everything to its right (the "lazy batch" update that makes GPTQ fast).

Groups share a scale and zero per output row, found from the group's current (already error-corrected) values
when its first column is quantized. A last group shorter than ``group_size`` is allowed. The processing order:

* plain: inputs in order; group g = inputs ``g·group_size …``;
* ``act_order`` (desc_act): columns by decreasing ``diag H``, and every ``group_size`` consecutive columns *in that
  order* form a group; ``g_idx`` records each original input's group (a permuted ``g_idx``);
* ``act_group_aware`` (GAR, Gafni et al. 2025, as in GPTQModel): the groups stay the plain contiguous input ranges,
  so ``g_idx[i] = i // group_size`` and the checkpoint is an ordinary (desc_act = false) GPTQ v1 checkpoint; only
  the order in which GPTQ visits the columns changes: groups by decreasing ``max diag H`` of their members, and
  inside each group columns by decreasing ``diag H``. The important columns are quantized while the most columns
  are still free to absorb their error, as with act-order, at no cost in format;
* ``act_order: "static"`` (llm-compressor's default ``actorder: static``/``weight``, GPTQModel's ``static_groups``):
  columns by decreasing ``diag H`` across the whole row, as desc_act, but the groups stay the contiguous input
  ranges (``g_idx[i] = i // group_size``: a plain desc_act = false checkpoint) and their scale and zero are fixed
  *before* GPTQ runs, from the original weights, since a group's members are now visited far apart (a group's
  parameters cannot wait for its error-corrected values). The lazy-batch blocks are then plain ``block_size``
  strides.

Inputs that never fire (zero rows of H) get weight 0 and, in H, the live inputs' mean diagonal, so the codes do
not depend on H's scale. ``relative_error`` is the layer-wise objective in the H-weighted norm, ``‖(W − Q) H^{1/2}‖² / ‖W H^{1/2}‖²`` on the
*undamped* Hessian: inputs that never fire (zero rows of H) count for nothing, and the figure does not depend on
H's scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from a3q.distributed import reduce_together
from a3q.quant.gptq_grid import group_parameters, quantize_columns
from a3q.quant.gptq_order import ActOrder, blocks, check_act_order, processing_order, segments

__all__ = ["HessianAccumulator", "HessianNotPositiveDefinite", "QuantizedWeight", "damped_inverse_factor",
           "group_parameters", "gptq_quantize", "processing_order", "quantize_columns", "weighted_relative_error"]


class HessianAccumulator:
    """Running ``2 E[x xᵀ]`` of a linear's inputs (one per distinct input, fed by a forward pre-hook).

    Each batch's product ``Xᵀ X`` is taken in float64 (inputs upcast) and summed in float64, as A³'s statistics are.
    Why not float32 products: a float32 sum over a batch's tokens rounds at ~1e-7 relative, differently for every
    batching of the same windows (one batch of 4 windows in one process, batches of 2 in each of two processes),
    and GPTQ turns such differences into different codes: a rounding near a tie flips a code, its error is fed into
    the row's later columns, and the sequential stream carries the change into every later layer (SmolLM2, A³ 20% +
    GPTQ 4-bit g64 at batch size 4: 72% of codes equal between the two batchings). In float64 the batchings differ by
    ~1e-15 and, on the same layer weights, gave identical codes in every layer. Cost: one ``in × in`` float64 product
    per batch (a float32 input has 24 mantissa bits, so each term ``x_i x_j`` is exact in float64; only the sum rounds).
    """

    #: columns per block of the upper-triangular block product (see :meth:`add`)
    BLOCK = 256

    def __init__(self, in_features: int) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.tokens = 0

    def add(self, inputs: Tensor) -> None:
        """Add ``Xᵀ X`` of this batch. Only the blocks on and above the block diagonal are computed (``X[:, i]ᵀ
        X[:, i:]`` per block row: 40% less float64 work for a 1536-input down_proj); :meth:`hessian` mirrors them.
        Each entry is still one dot product over the batch's tokens, so the sum is the full product's (bit for bit
        with the GEMMs measured here; the tests hold it to float64 rounding)."""
        flat = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64)
        if self.sum.device != flat.device:  # accumulate where the inputs are (the model's device)
            self.sum = self.sum.to(flat.device)
        # the batch's product first, then one addition: two processes' reduced sums then equal one process's sum
        # when the batches are the same (``sum += P0``, ``sum += P1`` vs ``P0 + P1``); an in-place addmm would not
        n = flat.shape[1]
        for start in range(0, n, self.BLOCK):
            self.sum[start : start + self.BLOCK, start:] += flat[:, start : start + self.BLOCK].t() @ flat[:, start:]
        self.tokens += flat.shape[0]

    def _mirrored(self, upper: Tensor) -> Tensor:
        """``upper`` (block-upper sums) made symmetric in place: each block below the diagonal from its mirror."""
        for start in range(self.BLOCK, upper.shape[0], self.BLOCK):
            upper[start:, start - self.BLOCK : start] = upper[start - self.BLOCK : start, start:].t()
        return upper

    def hessian(self) -> Tensor:
        return 2 * self._mirrored(self.sum.clone()) / max(self.tokens, 1)

    def take_hessian(self) -> Tensor:
        """:meth:`hessian`, bit for bit, computed in the accumulator's own memory (no ``in × in`` copy: 6 GiB in
        float64 for a 70B model's down_proj); the accumulator is spent afterwards."""
        hessian, self.sum = self._mirrored(self.sum), None
        return hessian.mul_(2).div_(max(self.tokens, 1))

    @staticmethod
    def reduce_all(accumulators: list[HessianAccumulator], reduce: Callable[[Tensor], Tensor]) -> None:
        """Sum every accumulator's ``sum`` and ``tokens`` over all processes in ONE ``reduce`` call (the sums, never
        ``hessian()``: normalising happens after); ``reduce(t)`` is the element-wise sum of ``t`` over the ranks."""
        if not accumulators:
            return
        device = accumulators[0].sum.device
        counts = torch.tensor([float(acc.tokens) for acc in accumulators], dtype=torch.float64, device=device)
        *sums, tokens = reduce_together([acc.sum for acc in accumulators] + [counts], reduce)
        for accumulator, total, count in zip(accumulators, sums, tokens.tolist()):
            accumulator.sum, accumulator.tokens = total, int(round(count))


@dataclass
class QuantizedWeight:
    """Integer codes ``[out, in]``, per-group ``scales``/``zeros [groups, out]``, ``g_idx [in]``, and the error."""

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    #: ``tr((W − Q) H (W − Q)ᵀ) / tr(W H Wᵀ)`` on the undamped H: the layer-wise objective GPTQ minimises, relative
    relative_error: float
    #: the damping fraction actually used (``damp_percent``, or more if ``damp_auto`` had to raise it)
    damp_percent: float = 0.0


class HessianNotPositiveDefinite(ValueError):
    """The damped Hessian could not be factorised (``damp_auto`` off, or even damping 1.0 failed)."""


def damped_inverse_factor(make_hessian: Callable[[], Tensor], damp_percent: float,
                          damp_auto: bool = False) -> tuple[Tensor, float]:
    """Upper Cholesky factor of ``(H + λ I)⁻¹``, ``λ = damp · mean(diag H)``, and the ``damp`` used.

    ``make_hessian()`` returns a fresh ``H`` that this function owns: it is damped in place and freed as soon as its
    Cholesky factor exists, and made again only if the damping has to grow. So at most two ``n × n`` matrices are
    alive here at any time (``n × n`` float64 is the largest thing GPTQ holds: 6 GiB for a 70B model's down_proj).
    With ``damp_auto`` the damping is doubled (capped at 1.0) until every factorisation succeeds; otherwise a
    failure raises :class:`HessianNotPositiveDefinite`.
    """
    H = make_hessian()
    mean = torch.mean(torch.diag(H))
    damp = damp_percent
    while True:
        H = make_hessian() if H is None else H
        H.diagonal().add_(damp * mean)
        lower, info = torch.linalg.cholesky_ex(H)
        H = None
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, damp
        if not damp_auto or damp >= 1.0:
            hint = "" if damp_auto else "; set damp_auto: true (or raise damp_percent)"
            raise HessianNotPositiveDefinite(
                f"the Hessian is not positive definite after damping {damp:g}·mean(diag H){hint}")
        damp = min(2 * damp, 1.0)


@torch.no_grad()
def gptq_quantize(
    weight: Tensor, hessian: Tensor, bits: int, group_size: int = -1, sym: bool = True,
    act_order: ActOrder = False, damp_percent: float = 0.01, block_size: int = 128,
    act_group_aware: bool = False, damp_auto: bool = False, mse: bool = False,
) -> QuantizedWeight:
    """Quantize ``weight [out, in]`` given its input Hessian ``[in, in]``; see the module docstring. ``mse``: each
    group's clipping range is searched (:func:`a3q.quant.gptq_grid.group_parameters`) instead of min/max."""
    check_act_order(act_order)
    out_features, in_features = weight.shape
    grouped = group_size > 0
    # float32 work (float64 for float64 input, as the brute-force tests use); the Hessian is inverted in float64.
    # Columns of W are rows of Wt, so every per-column step touches contiguous memory.
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    Wt = weight.detach().to(work).t().contiguous()  # [in, out]
    H_measured = hessian.to(device=Wt.device, dtype=torch.float64)  # kept (undamped) for the error at the end
    diagonal = torch.diag(H_measured)
    dead = diagonal == 0
    # an input that never fires carries no information: its weight is irrelevant (set to 0, quantized exactly) and
    # its diagonal is set to the live inputs' mean, so neither the damping nor anything else depends on H's scale
    live = diagonal[~dead]
    fill = float(live.mean()) if live.numel() else 1.0
    Wt[dead] = 0
    original = Wt if act_order == "static" and grouped else None  # static groups' parameters come from it
    order, groups = processing_order(diagonal.masked_fill(dead, fill), group_size, act_order, act_group_aware)
    Wt = Wt[order]
    dead_in_order = dead[order]

    def ordered_hessian() -> Tensor:
        """A fresh H in processing order with the dead inputs' diagonal filled (the inversion consumes it)."""
        H = H_measured.index_select(0, order).index_select(1, order)
        H[dead_in_order, dead_in_order] = fill
        return H

    H_inv, damp_used = damped_inverse_factor(ordered_hessian, damp_percent, damp_auto)
    H_inv = H_inv.to(work)

    runs = segments(groups)
    group_end = {a: (b, g) for a, b, g in runs}
    codes = torch.zeros_like(Wt)
    count = int(groups.max()) + 1
    scales = torch.zeros(count, out_features, dtype=work, device=Wt.device)
    zeros = torch.zeros(count, out_features, dtype=work, device=Wt.device)
    group_of = groups.tolist()  # read per column below: a host list, no device sync per column
    fixed = not grouped or act_order == "static"  # parameters known before the first column
    if not grouped:  # one group: its parameters come from the whole (uncorrected) row, as in the paper
        scales[0], zeros[0] = group_parameters(Wt.t(), bits, sym, mse)
    elif fixed:  # static groups: each contiguous group's parameters from its original (uncorrected) weights
        for g, first in enumerate(range(0, in_features, group_size)):
            scales[g], zeros[g] = group_parameters(original[first : first + group_size].t(), bits, sym, mse)
    del original
    # the rank-1 updates dominate the loop for wide layers (gate/up: 3072 rows): the product goes into one buffer
    # instead of a fresh tensor per column, and the column just quantized is not updated (nothing reads it again);
    # every value that is read is computed exactly as before, so the codes are the same bit for bit
    buffer = torch.empty(max((end - start for start, end in blocks(runs, in_features, block_size, not fixed)),
                             default=1), out_features, dtype=work, device=Wt.device)
    for start, end in blocks(runs, in_features, block_size, whole_groups=not fixed):
        block, block_inv = Wt[start:end].clone(), H_inv[start:end, start:end]
        errors = torch.zeros_like(block)
        width = end - start
        for i in range(width):
            column = start + i
            g = group_of[column]
            if not fixed and column in group_end:
                stop = group_end[column][0] - start
                scales[g], zeros[g] = group_parameters(block[i:stop].t(), bits, sym, mse)
            code, value = quantize_columns(block[i : i + 1].t(), scales[g], zeros[g], bits)
            codes[column] = code[:, 0]
            error = (block[i] - value[:, 0]) / block_inv[i, i]
            if i + 1 < width:
                update = torch.mul(block_inv[i, i + 1 :, None], error[None, :], out=buffer[: width - i - 1])
                block[i + 1 :] -= update
            errors[i] = error
        lazy_update(Wt, H_inv, start, end, errors)

    inverse = torch.argsort(order)
    del Wt, H_inv
    codes = codes.t()[:, inverse]
    g_idx = groups[inverse]
    # the values the loop quantized to, rebuilt from the codes by the same arithmetic (bit for bit)
    dequantized = scales[g_idx].t() * (codes - zeros[g_idx].t())
    return QuantizedWeight(
        codes=codes.to(torch.int32),
        scales=scales.to(torch.float16),
        zeros=zeros.to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        relative_error=weighted_relative_error(weight.detach(), dequantized, H_measured),
        damp_percent=damp_used,
    )


def lazy_update(Wt: Tensor, H_inv: Tensor, start: int, end: int, errors: Tensor) -> None:
    """After block ``[start, end)``: push its scaled errors onto every later column in one product (the lazy batch)."""
    Wt[end:] -= H_inv[start:end, end:].t() @ errors


def weighted_relative_error(weight: Tensor, dequantized: Tensor, hessian: Tensor, rows: int = 1024) -> float:
    """``tr((W − Q) H (W − Q)ᵀ) / tr(W H Wᵀ)``: GPTQ's objective relative to quantizing everything to zero.

    Pass the undamped Hessian: inputs that are always zero (zero rows/columns of H) then count for nothing.
    NaN if anything is non-finite (never hidden). ``rows`` output rows at a time, so it never holds a float64 copy of
    the whole weight. The products run in the weight's precision (float32 unless the weight is float64), the sums in
    float64: the figure is reported, never used to choose codes, and 6 digits are plenty, while float64 products
    took as long as all of GPTQ's column loop (an ``out × in × in`` product per linear).
    """
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    hessian = hessian.to(work)
    residual = torch.zeros((), dtype=torch.float64, device=hessian.device)
    reference = torch.zeros((), dtype=torch.float64, device=hessian.device)
    for start in range(0, weight.shape[0], rows):
        original = weight[start : start + rows].to(work)
        difference = original - dequantized[start : start + rows].to(work)
        residual += ((difference @ hessian) * difference).sum(dtype=torch.float64)
        reference += ((original @ hessian) * original).sum(dtype=torch.float64)
    if not bool(torch.isfinite(residual)) or not bool(torch.isfinite(reference)):
        return math.nan
    return float(residual / reference.clamp_min(1e-300)) if float(reference) > 0 else (0.0 if float(residual) == 0 else math.inf)
