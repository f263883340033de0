"""bitsandbytes 4-bit linears on CPU, computed exactly for every shape (torch only: imports neither a3q nor bitsandbytes).

Self-contained on purpose, like ``a3q_gptq_linear.py``: a3q uses it in-process (``a3q.quant.bnb``) and can copy it
next to an A³ modeling file, so a process without a3q (``trust_remote_code=True``) computes the same logits.

Two problems of bitsandbytes 0.50 on CPU, both hit by the per-layer shapes A³ leaves:

* On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode repacks its weight on the first call for a bf16
  kernel: activations are rounded to bf16 whatever ``compute_dtype`` says, and the repacking asserts
  ``out_features % 32 == 0``, an even ``in_features`` and whole blocks per row (459 inputs or 40 outputs fail).
  The flag ``support_avx512bf16_for_cpu = False`` keeps the reference path (dequantize, then matmul).
* The native CPU ``dequantize_4bit`` kernel of that reference path assumes every row of the weight is a whole
  number of blocks. bitsandbytes stores blocks over the flattened weight, so when ``in_features % blocksize != 0``
  (e.g. 576 inputs with blocksize 128, 48 inputs with 64) it scales codes with the wrong block's absmax, silently
  (the relative weight error triples). Such linears get :func:`exact_forward`, which dequantizes in torch.

Storage is untouched: the checkpoint stays a standard bitsandbytes one (GPU kernels read flat blocks correctly).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def is_linear4bit(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` (duck-typed: this file must not import bitsandbytes)."""
    return hasattr(module, "support_avx512bf16_for_cpu") and hasattr(getattr(module, "weight", None), "quant_state")


def rows_split_blocks(module: nn.Module) -> bool:
    """True when some block of the flattened weight spans two rows: the native CPU kernel gets those wrong."""
    return module.in_features % module.weight.blocksize != 0


def block_scales(state) -> Tensor:
    """The float32 absmax of every block; with double quantization, ``code2[q] · absmax2[i // blocksize2] + offset``."""
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError("weight is in bitsandbytes' AVX512-BF16 CPU layout; set support_avx512bf16_for_cpu = False "
                         "before the first forward pass")
    nested = getattr(state, "state2", None)
    if nested is None:
        return state.absmax.float()
    index = torch.arange(state.absmax.numel(), device=state.absmax.device) // nested.blocksize
    return nested.code[state.absmax.long()] * nested.absmax[index] + state.offset


def dequantize_4bit_exact(packed: Tensor, state, dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``[out, in]`` weight of bitsandbytes' 4-bit storage: two codes per byte (high nibble first), one absmax
    per ``blocksize`` consecutive weights of the flattened matrix (the last block may be shorter)."""
    flat = packed.reshape(-1).view(torch.uint8)
    count = int(state.shape[0]) * int(state.shape[1])
    codes = torch.stack((flat >> 4, flat & 15), dim=1).reshape(-1)[:count].long()
    values = state.code.float()[codes]
    scales = block_scales(state)
    blocksize = int(state.blocksize)
    whole = count - count % blocksize
    out = torch.empty(count, dtype=torch.float32, device=values.device)
    out[:whole] = (values[:whole].view(-1, blocksize) * scales[: whole // blocksize, None]).reshape(-1)
    if whole < count:
        out[whole:] = values[whole:] * scales[whole // blocksize]
    return out.view(int(state.shape[0]), int(state.shape[1])).to(dtype)


def exact_forward(self: nn.Module, x: Tensor) -> Tensor:
    """``Linear4bit.forward`` on CPU with the weight dequantized by :func:`dequantize_4bit_exact` (same dtypes:
    inputs and bias in ``compute_dtype``, the output back in the input's dtype); other devices: bitsandbytes'."""
    if x.device.type != "cpu":
        return type(self).forward(self, x)
    compute = self.compute_dtype or x.dtype
    weight = dequantize_4bit_exact(self.weight.data, self.weight.quant_state, compute)
    bias = None if self.bias is None else self.bias.to(compute)
    return F.linear(x.to(compute), weight, bias).to(x.dtype)


def use_exact_cpu_path(model: nn.Module) -> int:
    """Switch every bitsandbytes 4-bit linear of ``model`` to an exact CPU path (see the module docstring).

    Must run before the first eval-mode forward pass (the repacking happens there). Idempotent; returns how many
    linears were switched in this call.
    """
    switched = 0
    for module in model.modules():
        if not is_linear4bit(module):
            continue
        if module.support_avx512bf16_for_cpu:
            module.support_avx512bf16_for_cpu = False
            switched += 1
        if rows_split_blocks(module) and "forward" not in vars(module):
            module.forward = types.MethodType(exact_forward, module)
            switched += 1
    return switched


def bitsandbytes_cpu_hook(model: nn.Module, args) -> None:
    """Forward pre-hook for a model class: :func:`use_exact_cpu_path` before every call (cheap; no-op without bnb)."""
    use_exact_cpu_path(model)
