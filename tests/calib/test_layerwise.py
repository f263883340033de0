"""The shared layer-by-layer pass: grouping in the engine, one pass over the data, exact layer rebuilds."""

from __future__ import annotations

import copy

import torch

from a3q.arch import describe
from a3q.calib.layerwise import run_layerwise
from a3q.engine import plan_passes
from a3q.recipe import parse_recipe
from a3q.stages.a3.layerwise import A3Layerwise
from a3q.stages.a3.stage import A3Config
from a3q.stages.a3.apply import compress_model
from a3q.stages.a3.ranks import plan_ranks
from a3q.stages.a3.statistics import collect_statistics
from a3q.stages.gptq import GPTQConfig, GPTQLayerwise
from tests.stages.a3.test_pipeline_tiny import graph_of, tiny_llama, tokens


def _groups(stages):
    recipe = parse_recipe({"model": "smollm2-135m", "stages": stages}, check_model=False)
    return [[spec.name for spec in group] for group in plan_passes(recipe.stages)]


def test_engine_groups_consecutive_layerwise_stages_only():
    a3, gptq, evaluate = {"stage": "a3", "ratio": 0.2}, {"stage": "gptq", "bits": 4}, {"stage": "evaluate"}
    assert _groups([a3, gptq, evaluate]) == [["a3", "gptq"], ["evaluate"]]
    assert _groups([a3, evaluate, gptq]) == [["a3"], ["evaluate"], ["gptq"]]
    # global allocation needs every layer's statistics before any rank: it runs its own whole-model pass
    assert _groups([{**a3, "allocation": "global"}, gptq]) == [["a3"], ["gptq"]]


def test_full_rank_layerwise_a3_reproduces_the_model():
    graph = graph_of(tiny_llama(kv_heads=2))
    windows = tokens()
    with torch.no_grad():
        before = graph.model(windows).logits
    full = A3Config(qk_rank=16, vo_rank=16, ff_rank=80)
    compressed = run_layerwise(graph, windows, [A3Layerwise(full)], progress=False)
    with torch.no_grad():
        after = compressed.model(windows).logits
    assert torch.allclose(before, after, atol=1e-4)


def test_first_layer_matches_the_whole_model_pass_and_data_enters_once():
    """Layer 0 sees the same inputs either way, so its compressed weights agree; the embeddings run only once
    per batch for both stages together (the capture), never a full forward."""
    model = tiny_llama(kv_heads=2)
    windows = tokens()
    config = A3Config(ratio=0.25)
    reference = graph_of(copy.deepcopy(model))
    stats = collect_statistics(reference, windows, {"qk", "ov", "mlp"}, batch_size=4, progress=False)
    plans = plan_ranks(reference.layers, config.component_ratios(), config.explicit_ranks(), 1, True)
    whole, _ = compress_model(reference, stats, plans, config.damping, progress=False)

    graph = graph_of(model)
    calls = []
    graph.model.model.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    head_calls = []
    graph.model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    shared = run_layerwise(graph, windows, [A3Layerwise(config), GPTQLayerwise(GPTQConfig(bits=8, group_size=16))],
                           batch_size=4, progress=False)
    assert len(calls) == 2 and not head_calls  # 6 windows in batches of 4: two embedding calls in all
    layer_whole, layer_shared = whole.model.model.layers[0], shared.model.model.layers[0]
    assert layer_whole.mlp.down_proj.weight.shape == (48, 60)
    dequantized = layer_shared.mlp.down_proj.dequantize(torch.float32)
    assert dequantized.shape == (48, 60)
    assert torch.allclose(dequantized, layer_whole.mlp.down_proj.weight, atol=0.02)
    assert [layer.intermediate_size for layer in shared.layers] == [60, 60]
    assert all(layer.quantized.keys() == {"q", "k", "v", "o", "gate", "up", "down"} for layer in shared.layers)


def test_dense_export_with_partial_groups_names_the_torch_backend():
    """48 inputs in groups of 32: gptqmodel's default CPU kernel would refuse them, its torch backend does not."""
    graph = describe(tiny_llama(kv_heads=2), tokenizer=None, source="tiny")
    run_layerwise(graph, tokens(), [GPTQLayerwise(GPTQConfig(bits=4, group_size=32))], progress=False)
    assert graph.model.config.quantization_config["backend"] == "gptq_torch"
    even = describe(tiny_llama(kv_heads=2), tokenizer=None, source="tiny")
    run_layerwise(even, tokens(), [GPTQLayerwise(GPTQConfig(bits=4, group_size=16))], progress=False)
    assert "backend" not in even.model.config.quantization_config


def test_gptq_splits_dense_gpt2_and_quantizes_every_projection():
    from tests.stages.a3.test_pipeline_tiny import tiny_gpt2

    graph = describe(tiny_gpt2(), tokenizer=None, source="tiny")
    quantized = run_layerwise(graph, tokens(), [GPTQLayerwise(GPTQConfig(bits=8, group_size=16))], progress=False)
    assert quantized.model.config.model_type == "a3q_gpt2"
    assert all(layer.quantized.keys() == {"q", "k", "v", "o", "up", "down"} for layer in quantized.layers)
