"""A linear layer stored in the GPTQ v1 layout, dequantised on the fly (torch only).

This file is self-contained on purpose: a3q copies it into every A³ artifact, so a process without a3q
(``trust_remote_code=True``) rebuilds quantized linears from ``config.a3q_gptq``.

GPTQ v1 layout, for ``bits`` b and ``in_features`` rows of codes per output column:

* ``qweight`` int32 ``[ceil(in·b/32), out]``: each column's codes as one little-endian bit stream along the inputs
  (for b = 2/4/8 that is code i at bit ``(i mod 32/b)·b`` of word ``i·b/32``; for b = 3, 32 codes fill 3 words);
* ``qzeros`` int32 ``[groups, ceil(out·b/32)]``: zero points packed the same way along the outputs, stored minus one;
* ``scales`` float16 ``[groups, out]``; ``g_idx`` int32 ``[in]``: the group of each input (act-order permutes it);
* ``W[o, i] = scales[g, o] · (q[i, o] − (z[g, o] + 1))`` with ``g = g_idx[i]``.

Shapes that do not fill whole words (after A³, e.g. 459 inputs) are padded with zero codes; ``g_idx``'s length
keeps the true input count. A last, partial group is simply a group with fewer members in ``g_idx``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_BITS = (2, 3, 4, 8)


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Pack ``codes [n, m]`` (0 ≤ code < 2^bits) along dim 0 into int32 words ``[ceil(n·bits/32), m]``."""
    n, m = codes.shape
    words = torch.zeros(math.ceil(n * bits / 32) + 1, m, dtype=torch.int64, device=codes.device)
    offsets = torch.arange(n, dtype=torch.int64, device=codes.device) * bits
    word, shift = offsets // 32, (offsets % 32).unsqueeze(1)
    values = codes.to(torch.int64)
    words.index_add_(0, word, (values << shift) & 0xFFFFFFFF)
    spill = (shift + bits > 32).squeeze(1)  # codes that straddle two words (3-bit only)
    if spill.any():
        words.index_add_(0, word[spill] + 1, values[spill] >> (32 - shift[spill]))
    words = words[:-1]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(words: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_rows`: the first ``n`` codes of each column, as int32 ``[n, m]``."""
    unsigned = torch.cat([words.to(torch.int64) & 0xFFFFFFFF,
                          torch.zeros(1, words.shape[1], dtype=torch.int64, device=words.device)])
    offsets = torch.arange(n, dtype=torch.int64, device=words.device) * bits
    word, shift = offsets // 32, (offsets % 32).unsqueeze(1)
    low = unsigned[word] >> shift
    high = unsigned[word + 1] << (32 - shift)  # only matters where a code straddles two words
    return ((low | high) & ((1 << bits) - 1)).to(torch.int32)


class GPTQLinear(nn.Module):
    """``y = x Wᵀ + b`` with W kept as GPTQ v1 codes; :meth:`dequantize` rebuilds the float weight.

    Why dequantise on every call rather than use a packed kernel: it runs anywhere torch runs, for any shape
    A³ leaves (kernels want in/out multiples of 32–128), and gradients reach anything built on top of the
    dequantised weight (LoRA adapters), while the codes themselves stay frozen buffers.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if group_size > 0 else in_features
        groups = math.ceil(in_features / self.group_size)
        self.register_buffer("qweight", torch.zeros(math.ceil(in_features * bits / 32), out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, math.ceil(out_features * bits / 32), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32, device=device) // self.group_size)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else torch.float32

    def set_codes(self, codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor) -> None:
        """Store integer ``codes [out, in]``, ``scales``/``zeros [groups, out]`` and ``g_idx [in]``."""
        self.qweight.copy_(pack_rows(codes.t().contiguous(), self.bits))
        if int(zeros.min()) < 1:
            raise ValueError("GPTQ v1 stores zero points minus one: a zero point must be at least 1")
        self.qzeros.copy_(pack_rows((zeros.to(torch.int64) - 1).t().contiguous(), self.bits).t())
        self.scales.copy_(scales.to(torch.float16))
        self.g_idx.copy_(g_idx.to(torch.int32))

    def codes(self) -> Tensor:
        """Integer codes ``[out, in]``."""
        return unpack_rows(self.qweight, self.bits, self.in_features).t()

    def zeros(self) -> Tensor:
        """Zero points ``[groups, out]``, stored minus one (so a zero point lies in 1 … 2^bits − 1)."""
        stored = unpack_rows(self.qzeros.t().contiguous(), self.bits, self.out_features).t()
        return stored + 1

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float weight ``[out, in]``: ``scales[g] · (q − zero[g])`` per input's group ``g = g_idx[i]``."""
        groups = self.g_idx.long()
        scales = self.scales.float()[groups].t()  # [out, in]
        zeros = self.zeros().float()[groups].t()
        weight = scales * (self.codes().float() - zeros)
        return weight.to(dtype or self.weight_dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def replace_with_gptq_linears(model: nn.Module, spec: dict) -> None:
    """Swap the linears named in ``spec["modules"]`` for empty :class:`GPTQLinear` s (before loading weights).

    ``spec`` is ``config.a3q_gptq``: ``{"bits", "group_size", "modules": [path, …]}``; the codes arrive with the
    state dict.
    """
    for path in spec["modules"]:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        linear = getattr(parent, name)
        if isinstance(linear, GPTQLinear):
            continue
        replacement = GPTQLinear(linear.in_features, linear.out_features, spec["bits"], spec["group_size"],
                                 bias=linear.bias is not None, dtype=linear.weight.dtype, device=linear.weight.device)
        setattr(parent, name, replacement)
