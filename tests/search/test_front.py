"""Choosing what to build, the front and the pick, against brute force; Spearman against its closed form."""

from __future__ import annotations

import itertools
import random

import pytest

from a3q.search.candidate import Candidate
from a3q.search.front import measured_budget_problems, pareto_front, pick_best, select_for_build, spearman
from a3q.search.sizes import SizeEstimate
from a3q.search.space import Budget


def _points(seed: int, count: int = 9) -> list[dict]:
    rng = random.Random(seed)
    return [{"key": f"p{i}", "linear_bytes": rng.randrange(100, 200), "ppl": round(rng.uniform(10, 30), 1),
             "bits_per_param": 4.0, "kv_bytes_per_token": 100.0, "within_budget": rng.random() < 0.7}
            for i in range(count)]


@pytest.mark.parametrize("seed", range(20))
def test_the_front_is_exactly_the_points_no_other_point_dominates(seed):
    points = _points(seed)

    def dominated(p):
        return any(q["linear_bytes"] <= p["linear_bytes"] and q["ppl"] <= p["ppl"]
                   and (q["linear_bytes"], q["ppl"]) != (p["linear_bytes"], p["ppl"]) for q in points)

    brute = {p["key"] for p in points if not dominated(p)}
    front = {p["key"] for p in pareto_front(points)}
    # equal points (same size and ppl): the front keeps one of them
    assert front <= brute and {(p["linear_bytes"], p["ppl"]) for p in points if p["key"] in brute} == {
        (p["linear_bytes"], p["ppl"]) for p in points if p["key"] in front}


@pytest.mark.parametrize("seed", range(10))
def test_the_pick_is_the_best_feasible_point_and_never_one_outside_the_budget(seed):
    points = _points(seed)
    feasible = [p for p in points if p["within_budget"]]
    best = pick_best(points, Budget(bits_per_param=5.0))
    assert best["ppl"] == min(p["ppl"] for p in feasible) and best["within_budget"]
    smallest = pick_best(points, Budget(max_ppl=25.0))  # only a quality floor: the smallest feasible
    assert smallest["linear_bytes"] == min(p["linear_bytes"] for p in feasible)
    assert pick_best([{**p, "within_budget": False} for p in points], Budget(bits_per_param=5.0)) is None


def test_the_budget_is_checked_on_measured_sizes_and_perplexity():
    point = {"linear_bytes": 1000, "bits_per_param": 4.2, "kv_bytes_per_token": 50.0, "ppl": 21.0}
    assert measured_budget_problems(Budget(bits_per_param=4.2, weight_bytes=1000, max_ppl=21.0), point) == []
    problems = measured_budget_problems(Budget(bits_per_param=4.0, weight_bytes=999, max_ppl=20.0), point)
    assert [p.split()[0] for p in problems] == ["bits_per_param", "weight_bytes", "ppl"]


def test_builds_are_the_best_proxies_inside_the_size_budget_or_the_estimated_front_for_a_quality_floor():
    candidates = [Candidate(a3_ratio=r / 10) for r in range(6)]
    sizes = {c: SizeEstimate(100 - int(c.a3_ratio * 100), 8 * (100 - c.a3_ratio * 100) / 100, 10.0)
             for c in candidates}
    scores = {c: c.a3_ratio * (2 if c.a3_ratio == 0.3 else 1) for c in candidates}  # 0.3 is dominated by 0.4
    chosen = select_for_build(candidates, sizes, scores, Budget(bits_per_param=7.5), top=2)
    assert [c.a3_ratio for c in chosen] == [0.1, 0.2]  # 0.0 breaks the budget; best proxies first
    chosen = select_for_build(candidates, sizes, scores, Budget(max_ppl=30.0), top=10)
    assert sorted(c.a3_ratio for c in chosen) == [0.0, 0.1, 0.2, 0.4, 0.5]


@pytest.mark.parametrize("n", [3, 5, 8])
def test_spearman_without_ties_equals_its_closed_form(n):
    for xs, ys in itertools.islice(zip(itertools.permutations(range(n)), itertools.permutations(range(n)[::-1])), 30):
        d2 = sum((x - y) ** 2 for x, y in zip(xs, ys))
        assert spearman([float(x) for x in xs], [float(y) ** 3 for y in ys]) == pytest.approx(
            1 - 6 * d2 / (n * (n * n - 1)), abs=1e-12)
    assert spearman([1.0, 2.0], [2.0, 1.0]) is None and spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
