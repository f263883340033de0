"""A quantized KV cache that works with any per-layer key and value head dims (a3q's own ``Cache``).

Why not transformers' ``QuantizedCache``: its ``quanto`` backend only offers 2 and 4 bits (a3q needs 8 and 4),
its groups must divide the head dim (A³ leaves dims such as 44 or 51, different per layer and different for keys
and values), and it re-quantizes the *whole* cache from dequantized values every time the residual fills, so old
tokens collect rounding error and the stored size is whatever the backend packs. This cache quantizes every token
exactly once, in blocks of ``group_size`` tokens, and its storage is plain tensors whose size is the formula below.

Why this file is self-contained (torch + transformers only): it is copied into exported artifacts next to the
modeling file, so ``generate()`` after ``from_pretrained(..., trust_remote_code=True)`` can use it without a3q.

Layout (KIVI-style, arXiv 2402.02750), per layer and KV head, ``b`` bits, groups of ``G``:

* codes: unsigned integers, asymmetric min–max, packed along the head dim (two 4-bit codes per byte),
  ``ceil(r·b/8)`` bytes per token for a head of dim ``r``;
* values are quantized **per token** (groups of ``G`` channels, the last group may be shorter);
  keys per token too (``key_axis="token"``) or **per channel** (``key_axis="channel"``: one scale/zero per channel
  for each block of ``G`` tokens, which follows the outlier channels that keys have);
* every group stores a scale and a zero (the group minimum) in float16: 4 bytes.

Bytes per token of one layer (quantized part, batch 1)::

    h_kv · ( ceil(r_qk·b/8) + ceil(r_vo·b/8) + 4·ceil(r_vo/G) + K ),
    K = 4·ceil(r_qk/G)  (key_axis="token")   or   4·r_qk/G  (key_axis="channel")

The ``residual`` most recent tokens (up to ``residual + G − 1`` of them, as tokens are flushed in blocks of ``G``)
stay in full precision; that window is a constant per layer, not a per-token cost, and is excluded above.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

#: bytes of one stored scale or zero (float16)
META_BYTES = 2
DEFAULTS: dict[str, Any] = {"bits": 8, "group_size": 32, "residual": 128, "key_axis": "channel"}


def cache_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` completed with the defaults and checked (bits 4/8, G ≥ 1, residual ≥ 0, key_axis)."""
    full = {**DEFAULTS, **settings}
    if full["bits"] not in (4, 8):
        raise ValueError(f"KV cache bits must be 4 or 8, got {full['bits']}")
    if int(full["group_size"]) < 1 or int(full["residual"]) < 0:
        raise ValueError("KV cache group_size must be >= 1 and residual >= 0")
    if full["key_axis"] not in ("token", "channel"):
        raise ValueError(f"key_axis must be 'token' or 'channel', got {full['key_axis']!r}")
    return full


def quantized_bytes_per_token(kv_heads: int, qk_dim: int, vo_dim: int, settings: dict[str, Any]) -> float:
    """Exact bytes one token occupies in one layer's quantized store (the module docstring's formula)."""
    s = cache_settings(settings)
    bits, group = s["bits"], s["group_size"]
    codes = math.ceil(qk_dim * bits / 8) + math.ceil(vo_dim * bits / 8)
    value_meta = 2 * META_BYTES * math.ceil(vo_dim / group)
    key_meta = 2 * META_BYTES * (math.ceil(qk_dim / group) if s["key_axis"] == "token" else qk_dim / group)
    return kv_heads * (codes + value_meta + key_meta)


def quantize(x: torch.Tensor, bits: int, group: int, dim: int) -> dict[str, torch.Tensor]:
    """Asymmetric min–max quantization of ``x`` in groups of ``group`` along ``dim`` (a ragged last group is fine).

    The zero is the group minimum rounded *down* to float16 and the scale is rounded *up*, so every code lies in
    ``[0, 2^bits − 1]`` and the round-trip error is at most half a step (``scale / 2``) per element.
    """
    levels = 2**bits - 1
    moved = x.float().movedim(dim, -1)
    n = moved.shape[-1]
    pad = (-n) % group
    if pad:  # repeat the last element: it changes neither the min nor the max of the ragged group
        moved = torch.cat([moved, moved[..., -1:].expand(*moved.shape[:-1], pad)], dim=-1)
    grouped = moved.unflatten(-1, (-1, group))
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    zero = low.half()
    zero = torch.where(zero.float() > low, torch.nextafter(zero, torch.full_like(zero, -math.inf)), zero)
    scale = ((high - zero.float()) / levels).clamp_min(1e-4).half()
    short = scale.float() * levels < high - zero.float()
    scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    codes = ((grouped - zero.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    codes = codes.flatten(-2)[..., :n].movedim(-1, dim)
    return {"codes": pack(codes, bits), "scale": scale.squeeze(-1), "zero": zero.squeeze(-1)}


def dequantize(q: dict[str, torch.Tensor], bits: int, group: int, dim: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize`; ``size`` is the head dim (needed to unpack odd 4-bit rows)."""
    codes = unpack(q["codes"], bits, size).movedim(dim, -1).float()
    n = codes.shape[-1]
    scale = q["scale"].float().repeat_interleave(group, dim=-1)[..., :n]
    zero = q["zero"].float().repeat_interleave(group, dim=-1)[..., :n]
    return (codes * scale + zero).movedim(-1, dim).to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim (low nibble first); 8-bit codes as they are."""
    if bits == 8:
        return codes.contiguous()
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor, bits: int, size: int) -> torch.Tensor:
    if bits == 8:
        return packed
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)[..., :size]


class QuantizedKVLayer(DynamicLayer):
    """One layer's cache: a quantized store of old tokens plus a full-precision residual of recent ones.

    ``self.keys``/``self.values`` hold the residual (so transformers' helpers keep working); ``get_seq_length``
    counts both parts. Each call returns the full sequence: the quantized part dequantized, then the residual and
    the new states, so a token attends to itself and to its recent neighbours at full precision.
    """

    is_croppable = False  # quantized blocks cannot be cut at an arbitrary token

    def __init__(self, bits: int, group_size: int, residual: int, key_axis: str) -> None:
        super().__init__()
        self.bits, self.group, self.residual, self.key_axis = bits, group_size, residual, key_axis
        self.stored_tokens = 0
        self.key_blocks: list[dict[str, torch.Tensor]] = []
        self.value_blocks: list[dict[str, torch.Tensor]] = []

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.key_blocks:
            return None
        k_dim, v_dim = self.keys.shape[-1], self.values.shape[-1]
        key_dim = -1 if self.key_axis == "token" else -2
        keys = torch.cat([dequantize(b, self.bits, self.group, key_dim, k_dim, self.dtype) for b in self.key_blocks], -2)
        values = torch.cat([dequantize(b, self.bits, self.group, -1, v_dim, self.dtype) for b in self.value_blocks], -2)
        return keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        old = self._dequantized()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        keys, values = (self.keys, self.values) if old is None else (
            torch.cat([old[0], self.keys], dim=-2),
            torch.cat([old[1], self.values], dim=-2),
        )
        flush = (self.keys.shape[-2] - self.residual) // self.group * self.group
        if flush > 0:
            self._store(self.keys[..., :flush, :], self.values[..., :flush, :])
            self.keys, self.values = self.keys[..., flush:, :].clone(), self.values[..., flush:, :].clone()
        return keys, values

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize ``flush`` (a multiple of G) old tokens, block by block of G tokens for per-channel keys."""
        if self.key_axis == "token":
            self.key_blocks.append(quantize(keys, self.bits, self.group, -1))
        else:
            for start in range(0, keys.shape[-2], self.group):
                self.key_blocks.append(quantize(keys[..., start : start + self.group, :], self.bits, self.group, -2))
        self.value_blocks.append(quantize(values, self.bits, self.group, -1))
        self.stored_tokens += keys.shape[-2]

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.stored_tokens + self.keys.shape[-2]

    def reset(self) -> None:
        super().reset()
        self.stored_tokens = 0
        self.key_blocks, self.value_blocks = [], []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        super().reorder_cache(beam_idx)
        for block in self.key_blocks + self.value_blocks:
            for name, tensor in block.items():
                block[name] = tensor.index_select(0, beam_idx.to(tensor.device))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("the quantized KV cache cannot be cropped (assisted decoding is not supported)")

    def stored_bytes(self) -> dict[str, int]:
        """Bytes actually held: the quantized store (codes + scales + zeros) and the full-precision residual."""
        quantized = sum(t.numel() * t.element_size() for b in self.key_blocks + self.value_blocks for t in b.values())
        residual = 0 if not self.is_initialized else sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        residual_tokens = 0 if not self.is_initialized else self.keys.shape[-2]
        return {"quantized_tokens": self.stored_tokens, "quantized": quantized, "residual_tokens": residual_tokens, "residual": residual}


class QuantizedKVCache(Cache):
    """One :class:`QuantizedKVLayer` per decoder layer; the settings are ``bits``, ``group_size``, ``residual``,
    ``key_axis`` (see the module docstring). Head dims are taken from the states, so every layer may differ."""

    def __init__(self, num_layers: int, **settings: Any) -> None:
        s = cache_settings(settings)
        self.settings = s
        layers = [QuantizedKVLayer(s["bits"], int(s["group_size"]), int(s["residual"]), s["key_axis"]) for _ in range(num_layers)]
        super().__init__(layers=layers)

    def stored_bytes(self) -> dict[str, int]:
        """Totals of :meth:`QuantizedKVLayer.stored_bytes` over layers (token counts are per layer)."""
        per_layer = [layer.stored_bytes() for layer in self.layers]
        return {
            "quantized_tokens": per_layer[0]["quantized_tokens"] if per_layer else 0,
            "residual_tokens": per_layer[0]["residual_tokens"] if per_layer else 0,
            "quantized": sum(p["quantized"] for p in per_layer),
            "residual": sum(p["residual"] for p in per_layer),
        }
