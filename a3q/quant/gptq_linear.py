"""a3q's GPTQ linear (GPTQ v1 layout, see :mod:`a3q.modeling.a3q_gptq_linear`) as a storage format: its record and
its exact bytes (the ``gptq`` entry of :mod:`a3q.module_types`)."""

from __future__ import annotations

import math
from typing import Any

from a3q.modeling.a3q_gptq_linear import SUPPORTED_BITS, GPTQLinear, pack_rows, replace_with_gptq_linears, unpack_rows

__all__ = ["GPTQLinear", "SUPPORTED_BITS", "describe", "pack_rows", "replace_with_gptq_linears", "stored_bytes", "unpack_rows"]


def describe(module: Any) -> dict | None:
    if not isinstance(module, GPTQLinear):
        return None
    return {"method": "gptq", "bits": module.bits, "group_size": module.group_size}


def stored_bytes(storage: dict, fan_in: int, fan_out: int) -> int:
    """qweight + qzeros (int32 words) + fp16 scales + int32 g_idx, exactly as :class:`GPTQLinear` stores them."""
    bits, group = storage["bits"], storage["group_size"]
    groups = math.ceil(fan_in / group)
    qweight = 4 * math.ceil(fan_in * bits / 32) * fan_out
    qzeros = 4 * groups * math.ceil(fan_out * bits / 32)
    return qweight + qzeros + 2 * groups * fan_out + 4 * fan_in

