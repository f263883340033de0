"""The order in which GPTQ visits a weight's columns, and the lazy-batch blocks along it.

Separate from :mod:`a3q.quant.gptq` so the algorithm stays readable; the orderings themselves are described in that
module's docstring. ``order[p]`` is the original input visited at position ``p``; ``groups[p]`` its group id.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

#: ``False`` (inputs in order), ``True`` (desc_act: groups permuted, g_idx records them) or ``"static"``
ActOrder = bool | Literal["static"]


def check_act_order(act_order: ActOrder) -> ActOrder:
    """Refuse anything but the three settings (a misspelt string would otherwise count as ``True``)."""
    if not (act_order is True or act_order is False or act_order == "static"):
        raise ValueError(f"act_order must be false, true or 'static', got {act_order!r}")
    return act_order


def processing_order(diagonal: Tensor, group_size: int, act_order: ActOrder = False,
                     act_group_aware: bool = False) -> tuple[Tensor, Tensor]:
    """``order`` (position → original input) and ``groups`` (position → group id) of the columns GPTQ visits.

    With ``group_size <= 0`` everything is group 0. ``static``: columns by decreasing ``diag H`` (as desc_act), but
    every input keeps its contiguous group ``i // group_size``, so ``groups`` along the order jumps between groups.
    """
    check_act_order(act_order)
    if act_order and act_group_aware:
        raise ValueError("act_order and act_group_aware are exclusive (act_group_aware keeps groups contiguous)")
    n = diagonal.shape[0]
    group = group_size if group_size > 0 else n
    if act_group_aware and group_size > 0:
        starts = list(range(0, n, group))
        local = [start + torch.argsort(diagonal[start : start + group], descending=True, stable=True) for start in starts]
        metric = torch.stack([diagonal[start : start + group].max() for start in starts])
        visit = torch.argsort(metric, descending=True, stable=True).tolist()
        order = torch.cat([local[g] for g in visit])
        groups = torch.cat([torch.full((local[g].shape[0],), g, dtype=torch.long, device=diagonal.device)
                            for g in visit])
        return order, groups
    if act_order:
        order = torch.argsort(diagonal, descending=True, stable=True)
    else:
        order = torch.arange(n, device=diagonal.device)
    if act_order == "static":
        return order, order // group
    return order, torch.arange(n, device=diagonal.device) // group


def segments(groups: Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs ``(start, end, group id)`` of equal group ids along the processing order."""
    changes = (torch.nonzero(groups[1:] != groups[:-1]).flatten() + 1).tolist()
    bounds = [0, *changes, groups.shape[0]]
    return [(a, b, int(groups[a])) for a, b in zip(bounds[:-1], bounds[1:])]


def blocks(runs: list[tuple[int, int, int]], n: int, block_size: int, whole_groups: bool) -> list[tuple[int, int]]:
    """Lazy-batch blocks. With ``whole_groups`` they hold whole groups (so a group's parameters come from
    up-to-date columns): ≤ block_size columns unless one group is larger, in which case the block is that group.
    Otherwise (no groups, or static groups whose parameters are fixed beforehand) plain ``block_size`` strides."""
    if not whole_groups:
        return [(start, min(start + block_size, n)) for start in range(0, n, block_size)]
    out, start, end = [], 0, 0
    for a, b, _ in runs:
        if end > start and b - start > block_size:
            out.append((start, end))
            start = a
        end = b
    out.append((start, end))
    return out
