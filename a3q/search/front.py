"""Choosing: which candidates to build, which measured points form the front, which point is the pick.

Pure functions over plain values, so each rule is tested alone. A measured point is a dict (it is what
``front.json`` holds): ``key``, ``linear_bytes`` (measured on the artifact), ``bits_per_param``,
``kv_bytes_per_token``, ``ppl``, ``proxy``, ``within_budget``, …
"""

from __future__ import annotations

from typing import Any

from a3q.search.candidate import Candidate
from a3q.search.sizes import SizeEstimate
from a3q.search.space import SIZE_BUDGETS, Budget


def has_size_budget(budget: Budget) -> bool:
    return any(getattr(budget, name) is not None for name in SIZE_BUDGETS)


def select_for_build(candidates: list[Candidate], sizes: dict[Candidate, SizeEstimate], scores: dict[Candidate, float],
                     budget: Budget, top: int) -> list[Candidate]:
    """The candidates to build and measure, in build order.

    With a size budget: the ``top`` best proxy scores among the candidates whose estimated size fits (ties: the
    smaller first). With only ``max_ppl``: the pick is the smallest model under the floor, and where the floor falls
    is unknown until measured, so the candidates on the estimated front (no other is both smaller and better by
    proxy) are built, ``top`` of them spread evenly from the smallest to the largest.
    """
    inside = [c for c in candidates if not budget.size_problems(sizes[c])]
    if has_size_budget(budget):
        return sorted(inside, key=lambda c: (scores[c], sizes[c].linear_bytes, c.key))[:top]
    by_size = sorted(inside, key=lambda c: (sizes[c].linear_bytes, scores[c], c.key))
    front: list[Candidate] = []
    for candidate in by_size:
        if not front or scores[candidate] < scores[front[-1]]:
            front.append(candidate)
    if len(front) <= top:
        return front
    step = (len(front) - 1) / max(top - 1, 1)
    return [front[round(i * step)] for i in range(top)] if top > 1 else front[:1]


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The measured points no other point beats on both size (``linear_bytes``) and perplexity, smallest first."""
    front: list[dict[str, Any]] = []
    for point in sorted(points, key=lambda p: (p["linear_bytes"], p["ppl"])):
        if not front or point["ppl"] < front[-1]["ppl"]:
            front.append(point)
    return front


def pick_best(points: list[dict[str, Any]], budget: Budget) -> dict[str, Any] | None:
    """The best measured point within the budget (checked on the real artifact): the lowest perplexity when a size
    budget is given, else (only ``max_ppl``) the smallest; None when no measured point is within it."""
    feasible = [p for p in points if p["within_budget"]]
    if not feasible:
        return None
    if has_size_budget(budget):
        return min(feasible, key=lambda p: (p["ppl"], p["linear_bytes"], p["key"]))
    return min(feasible, key=lambda p: (p["linear_bytes"], p["ppl"], p["key"]))


def measured_budget_problems(budget: Budget, point: dict[str, Any]) -> list[str]:
    """What the built artifact breaks: its measured size budgets, and ``max_ppl`` against its measured perplexity."""
    problems = budget.size_problems(SizeEstimate(point["linear_bytes"], point["bits_per_param"],
                                                 point["kv_bytes_per_token"]))
    if budget.max_ppl is not None and not point["ppl"] <= budget.max_ppl:
        problems.append(f"ppl {point['ppl']:.4g} > {budget.max_ppl:.4g}")
    return problems


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (ties share their mean rank); None for fewer than 3 points or a constant side."""
    if len(xs) != len(ys) or len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if vx == 0 or vy == 0 else cov / (vx * vy) ** 0.5
