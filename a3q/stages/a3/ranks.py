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
) -> list[LayerRanks]:
    """Per-layer ranks for component ratios / explicit ranks (None: component left as is)."""
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
        plans.append(LayerRanks(qk=kept["qk"], vo=kept["ov"], ff=kept["mlp"]))
    return plans
