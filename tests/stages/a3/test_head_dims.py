"""Kernel-aware ranks (``head_dims``): q/k and v/o get one head size from a backend's grid, at the asked budget.

Uniform plans round the asked size down to the grid and give what that removes beyond the budget back to the MLP;
global plans choose each layer's grid size by the joint modelled loss. Both must land on sizes the backend runs
(so a server pads nothing) and remove what the unconstrained plan removes, within one MLP channel per layer.
"""

from __future__ import annotations

import pytest

from a3q.graph import LayerStructure
from a3q.stages.a3.allocation import plan_global_ranks
from a3q.stages.a3.apply import compress_model
from a3q.stages.a3.ranks import HEAD_DIM_GRIDS, allowed_head_dims, plan_ranks
from a3q.stages.a3.stage import A3Config
from a3q.stages.a3.statistics import collect_statistics
from tests.stages.a3.test_pipeline_tiny import ALL, graph_of, tiny_llama, tokens

SMOLLM2_LAYER = LayerStructure(num_heads=9, num_kv_heads=3, head_dim=64, qk_head_dim=64, vo_head_dim=64,
                               intermediate_size=1536)


def layer_params(plan, layer: LayerStructure) -> int:
    """Decoder-linear parameters of one layer per unit of hidden size (hidden cancels in every comparison here)."""
    return (plan.qk + plan.vo) * (layer.num_heads + layer.num_kv_heads) + plan.ff * (3 if layer.gated_mlp else 2)


@pytest.mark.parametrize("head_dims, ratio, expected", [("vllm-cpu", 0.2, 32), ("flash", 0.2, 48),
                                                        ("flash", 0.1, 56), ("vllm-cpu", 0.45, 32)])
def test_uniform_plan_picks_a_grid_size_and_keeps_the_budget(head_dims, ratio, expected):
    ratios = {c: ratio for c in ALL}
    free = plan_ranks([SMOLLM2_LAYER], ratios, {}, 1, rope=True)[0]
    kernel = plan_ranks([SMOLLM2_LAYER], ratios, {}, 1, rope=True, head_dims=head_dims)[0]
    assert kernel.qk == kernel.vo == expected and expected in HEAD_DIM_GRIDS[head_dims]
    # the MLP takes back what the grid removed beyond the asked sizes: within one channel of the same budget
    assert 0 <= layer_params(kernel, SMOLLM2_LAYER) - layer_params(free, SMOLLM2_LAYER) < 3
    assert layer_params(kernel, SMOLLM2_LAYER) <= layer_params(plan_ranks([SMOLLM2_LAYER], {c: 0.0 for c in ALL}, {},
                                                                          1, rope=True)[0], SMOLLM2_LAYER)


def test_explicit_ranks_must_be_on_the_grid_and_small_heads_are_refused():
    explicit = {"qk": 48, "ov": 48, "mlp": None}
    assert plan_ranks([SMOLLM2_LAYER], {}, explicit, 1, rope=True, head_dims="flash")[0].qk == 48
    with pytest.raises(ValueError, match=r"qk_rank = vo_rank in \[32, 64\]"):
        plan_ranks([SMOLLM2_LAYER], {}, explicit, 1, rope=True, head_dims="vllm-cpu")
    with pytest.raises(ValueError, match="qk_rank = vo_rank"):
        plan_ranks([SMOLLM2_LAYER], {}, {"qk": 48, "ov": 40}, 1, rope=True, head_dims="flash")
    small = LayerStructure(num_heads=4, num_kv_heads=2, head_dim=16, qk_head_dim=16, vo_head_dim=16,
                           intermediate_size=80)
    assert allowed_head_dims("vllm-cpu", 16) == [] and allowed_head_dims("any", 16) is None
    with pytest.raises(ValueError, match="runs no head size up to this model's 16"):
        plan_ranks([small], {c: 0.2 for c in ALL}, {}, 1, rope=True, head_dims="vllm-cpu")


def test_config_refuses_head_dims_where_it_cannot_hold():
    assert A3Config(ratio=0.2, head_dims="vllm-cpu").head_dims == "vllm-cpu"
    with pytest.raises(ValueError, match="must hold both qk and ov"):
        A3Config(ratio=0.2, components=["qk", "mlp"], head_dims="flash")
    with pytest.raises(ValueError, match="qk_norm: keep keeps whole"):
        A3Config(ratio=0.2, qk_norm="keep", head_dims="flash")
    with pytest.raises(ValueError, match="rank_multiple"):
        A3Config(ratio=0.2, rank_multiple=8, head_dims="flash")
    with pytest.raises(ValueError, match="head_dims"):
        A3Config(ratio=0.2, head_dims="triton")


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_global_plan_puts_every_layer_on_the_grid_within_the_budget(ratio):
    graph = graph_of(tiny_llama(kv_heads=2))  # head dim 16: the flash grid is 8, 16
    windows = tokens()
    stats = collect_statistics(graph, windows, set(ALL), progress=False)
    ratios = {c: ratio for c in ALL}
    allocation = plan_global_ranks(graph, stats, ratios, windows[:2], progress=False, head_dims="flash")
    uniform = plan_ranks(graph.layers, ratios, {}, 1, rope=True)
    for plan, layer in zip(allocation.plans, graph.layers):
        assert plan.qk == plan.vo and plan.qk in (8, 16) and 0 < plan.ff <= layer.intermediate_size
    compressed, _ = compress_model(graph, stats, allocation.plans, 1e-6, frozenset(ALL), progress=False)
    free, _ = compress_model(graph, stats, uniform, 1e-6, frozenset(ALL), progress=False)
    removed = graph.decoder_linear_params() - compressed.decoder_linear_params()
    assert removed == allocation.removed >= allocation.target
    # the same budget as the unconstrained plan: at most one MLP channel per layer beyond it
    per_channel = 3 * graph.hidden_size
    assert removed - (graph.decoder_linear_params() - free.decoder_linear_params()) <= per_channel * len(graph.layers)


def test_a_model_whose_heads_the_backend_cannot_run_is_refused_before_it_loads(tmp_path):
    import json

    from a3q.recipe import RecipeError, parse_recipe
    from tests.stages.a3.test_pipeline_tiny import tiny_llama

    from a3q.assets.models import smollm2_path

    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)  # head dim 16: vLLM's CPU attention runs 32 and up
    for tokenizer_file in smollm2_path().glob("tokenizer*"):  # a folder recipes accept needs a tokenizer
        (folder / tokenizer_file.name).write_bytes(tokenizer_file.read_bytes())
    assert json.loads((folder / "config.json").read_text())["head_dim"] == 16
    raw = {"model": str(folder), "stages": [{"stage": "a3", "ratio": 0.2, "head_dims": "vllm-cpu"}]}
    with pytest.raises(RecipeError) as caught:
        parse_recipe(raw)
    assert any("stages[0]" in problem and "head_dims: vllm-cpu runs no head size up to the model's 16" in problem
               for problem in caught.value.problems), caught.value.problems
    parse_recipe({**raw, "stages": [{"stage": "a3", "ratio": 0.2, "head_dims": "flash"}]})  # 8 and 16 run
