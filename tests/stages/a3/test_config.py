"""The a3 stage's config and rank budget: validated at recipe load, rounded as documented."""

from __future__ import annotations

import pytest

from a3q.graph import LayerStructure
from a3q.recipe import RecipeError, parse_recipe
from a3q.stages.a3.ranks import plan_ranks, round_rank


def _problems(stage: dict) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"model": "smollm2-135m", "stages": [stage]})
    return caught.value.problems


def test_budget_errors_name_stage_and_field():
    assert _problems({"stage": "a3"}) == ["stages[0] (a3): qk: no budget: set ratio, qk or qk_rank"]
    assert _problems({"stage": "a3", "ratio": 1.0})[0].startswith("stages[0] (a3): ratio: Input should be less than 1")
    assert _problems({"stage": "a3", "ratio": 0.2, "components": ["qk"], "mlp": 0.1}) == [
        "stages[0] (a3): mlp: a budget is given but 'mlp' is not in components"
    ]
    assert _problems({"stage": "a3", "ratio": 0.2, "components": ["qk", "qk"]}) == [
        "stages[0] (a3): components: each of qk, ov, mlp may appear once"
    ]
    assert _problems({"stage": "a3", "ratio": 0.2, "components": ["kv"]})[0].startswith("stages[0] (a3): components.0:")
    assert _problems({"stage": "a3", "vo_rank": 0, "ratio": 0.1})[0].startswith("stages[0] (a3): vo_rank:")


def test_component_ratios_fall_back_to_ratio():
    recipe = parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "a3", "ratio": 0.2, "mlp": 0.3, "components": ["qk", "mlp"]}]})
    config = recipe.stages[0].config
    assert config.component_ratios() == {"qk": 0.2, "ov": None, "mlp": 0.3}


def test_defaults_are_the_best_measured_settings_and_the_report_row_says_so():
    """Issue 31: a recipe that names only ``ratio`` gets global ranks (better at every ratio on both real models and
    both texts); explicit ranks are uniform by nature; the previous behaviour is one field away."""
    def config(**fields):
        return parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "a3", **fields}]}).stages[0].config

    assert config(ratio=0.2).allocation == "global" and config(ratio=0.2).max_shift == 0.3
    assert config(qk_rank=32, vo_rank=32, ff_rank=512).allocation == "uniform"
    assert config(ratio=0.2, allocation="uniform").allocation == "uniform"
    assert config(ratio=0.2).qk_norm == "post_norm" and config(ratio=0.2, allocation="uniform").qk_norm == "pre_norm"

    import torch

    from a3q.engine import apply_stage
    from tests.stages.a3.test_pipeline_tiny import graph_of, tiny_llama

    windows = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(0))
    _, row = apply_stage(graph_of(tiny_llama()), "a3", windows=windows, ratio=0.3, probe_windows=2, probe_seq_len=16)
    assert row["allocation"] == "global" and set(row["sensitivity"]) == {"qk", "ov", "mlp"}


def _layer(**sizes) -> LayerStructure:
    base = dict(num_heads=9, num_kv_heads=3, head_dim=64, qk_head_dim=64, vo_head_dim=64, intermediate_size=1536)
    return LayerStructure(**{**base, **sizes})


def test_rounding_is_down_even_under_rope_and_to_the_multiple():
    assert round_rank(0.9 * 64, 64, 1, even=True) == 56  # 57.6 → 57 → even 56
    assert round_rank(0.9 * 64, 64, 1, even=False) == 57
    assert round_rank(0.9 * 64, 64, 8, even=False) == 56
    assert round_rank(0.8 * 64, 64, 32, even=False) == 32
    assert round_rank(0.01 * 64, 64, 8, even=True) == 8  # never below one step
    assert round_rank(64.0, 64, 1, even=True) == 64


def test_uniform_ratio_removes_at_least_the_requested_fraction():
    layers = [_layer() for _ in range(4)]
    hidden = 576
    before = sum(layer.linear_params(hidden) for layer in layers)
    for ratio in (0.1, 0.2, 0.3, 0.5):
        plans = plan_ranks(layers, {"qk": ratio, "ov": ratio, "mlp": ratio}, {}, 1, rope=True)
        after = sum(_layer(qk_head_dim=p.qk, vo_head_dim=p.vo, intermediate_size=p.ff).linear_params(hidden) for p in plans)
        achieved = 1 - after / before
        assert ratio <= achieved < ratio + 0.03
        assert all(p.qk % 2 == 0 for p in plans)


def test_explicit_ranks_are_checked():
    layers = [_layer()]
    assert plan_ranks(layers, {}, {"qk": 32, "ov": 40, "mlp": 1000}, 1, rope=True)[0].vo == 40
    with pytest.raises(ValueError, match="must be even"):
        plan_ranks(layers, {}, {"qk": 33}, 1, rope=True)
    assert plan_ranks(layers, {}, {"qk": 33}, 1, rope=False)[0].qk == 33
    with pytest.raises(ValueError, match="exceeds"):
        plan_ranks(layers, {}, {"ov": 65}, 1, rope=True)
