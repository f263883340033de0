"""The calibration pipeline: grouping in the engine, dense vs sequential statistics, exact layer rebuilds, probes.

Shapes and bookkeeping on tiny random models; the numbers that must not move are pinned on SmolLM2 in
``tests/test_pinned_results.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from a3q.arch import decoder_layers, describe
from a3q.engine import apply_stage, apply_stages
from a3q.pipeline.groups import plan_groups
from a3q.pipeline.runner import LayerProbe, run_pipeline
from a3q.pipeline.stage import CalibratingStage
from a3q.recipe import parse_recipe
from a3q.registry import build_stages
from a3q.stages.a3.apply import compress_model
from a3q.stages.a3.ranks import plan_ranks
from a3q.stages.a3.stage import A3Config, A3Stage
from a3q.stages.a3.statistics import collect_statistics
from a3q.stages.gptq import GPTQConfig, GPTQStage
from tests.stages.a3.test_pipeline_tiny import graph_of, tiny_gpt2, tiny_llama, tokens


def _groups(stages):
    recipe = parse_recipe({"model": "smollm2-135m", "stages": stages}, check_model=False)
    workers = build_stages(recipe)
    names = {id(worker): spec.name for worker, spec in zip(workers, recipe.stages)}
    return [[names[id(worker)] for worker in group] for group in plan_groups(workers)]


def test_engine_groups_consecutive_calibrating_stages_only():
    a3, gptq, evaluate = {"stage": "a3", "allocation": "uniform", "ratio": 0.2}, {"stage": "gptq", "bits": 4}, {"stage": "evaluate"}
    assert _groups([a3, gptq, evaluate]) == [["a3", "gptq"], ["evaluate"]]
    assert _groups([a3, evaluate, gptq]) == [["a3"], ["evaluate"], ["gptq"]]
    # a planning stage (global allocation) sees the model as its pass receives it: it starts a pass of its own
    assert _groups([{**a3, "allocation": "global"}, gptq]) == [["a3", "gptq"]]
    assert _groups([{**a3, "components": ["mlp"]}, {**a3, "allocation": "global", "components": ["qk"]}]) == [["a3"], ["a3"]]
    assert _groups([{"stage": "kv", "bits": 8}, gptq]) == [["kv"], ["gptq"]]  # bits only: no calibration
    # KV ranks are planned from the sizes A³ leaves: one resizing stage per pass (GPTQ still joins)
    assert _groups([{**a3, "components": ["mlp"]}, {"stage": "kv", "kv_ratio": 0.3}, gptq]) == [["a3"], ["kv", "gptq"]]


def test_a3_then_kv_ranks_leave_config_modules_and_description_agreeing():
    graph, _ = apply_stages(graph_of(tiny_llama()), [("a3", {"allocation": "uniform", "ratio": 0.3, "components": ["mlp"]}),
                                                     ("kv", {"kv_ratio": 0.3})], tokens())
    layers = graph.model.model.layers
    assert graph.model.config.intermediate_sizes == [layer.mlp.gate_proj.out_features for layer in layers] == \
        [layer.intermediate_size for layer in graph.layers] == [56, 56]
    assert graph.model.config.qk_head_dims == [layer.qk_head_dim for layer in graph.layers]
    assert all(layer.qk_head_dim < 16 for layer in graph.layers)


def test_full_rank_a3_reproduces_the_model_with_either_statistics():
    windows = tokens()
    for statistics in ("dense", "sequential"):
        graph = graph_of(tiny_llama(kv_heads=2))
        with torch.no_grad():
            before = graph.model(windows).logits
        compressed, _ = apply_stage(graph, "a3", windows=windows, qk_rank=16, vo_rank=16, ff_rank=80,
                                    statistics=statistics)
        with torch.no_grad():
            after = compressed.model(windows).logits
        assert torch.allclose(before, after, atol=1e-4), statistics


def test_dense_statistics_equal_a_whole_model_pass_and_data_enters_once():
    """``statistics: dense`` is the paper's protocol: every layer's weights equal compressing from one whole-model
    forward, even with GPTQ in the same pass (GPTQ reads the compressed stream); embeddings run once per batch."""
    model = tiny_llama(kv_heads=2)
    windows = tokens()
    config = A3Config(allocation="uniform", ratio=0.25)
    reference = graph_of(copy.deepcopy(model))
    stats = collect_statistics(reference, windows, {"qk", "ov", "mlp"}, batch_size=4, progress=False)
    plans = plan_ranks(reference.layers, config.component_ratios(), config.explicit_ranks(), 1, True)
    whole, _ = compress_model(reference, stats, plans, config.damping, progress=False)

    graph = graph_of(model)
    calls, head_calls = [], []
    graph.model.model.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    graph.model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    a3_only = run_pipeline(graph_of(copy.deepcopy(model)), windows, [A3Stage(config)], progress=False)
    shared = run_pipeline(graph, windows, [A3Stage(config), GPTQStage(GPTQConfig(bits=8, group_size=16))],
                          progress=False)
    assert len(calls) == 2 and not head_calls  # 6 windows in batches of 4: two embedding calls in all
    for index in range(2):
        expected = whole.model.model.layers[index].mlp.down_proj.weight
        assert torch.equal(a3_only.model.model.layers[index].mlp.down_proj.weight, expected)
        dequantized = shared.model.model.layers[index].mlp.down_proj.dequantize(torch.float32)
        assert dequantized.shape == (48, 60) and torch.allclose(dequantized, expected, atol=0.02)
    assert [layer.intermediate_size for layer in shared.layers] == [60, 60]
    assert all(layer.quantized.keys() == {"q", "k", "v", "o", "gate", "up", "down"} for layer in shared.layers)


def test_sequential_statistics_see_the_compressed_layers_before():
    """Layer 0 has the same inputs either way; layer 1's differ once layer 0 is compressed."""
    model = tiny_llama(kv_heads=2)
    windows = tokens()
    dense = run_pipeline(graph_of(copy.deepcopy(model)), windows, [A3Stage(A3Config(allocation="uniform", ratio=0.25))], progress=False)
    sequential = run_pipeline(graph_of(model), windows, [A3Stage(A3Config(allocation="uniform", ratio=0.25, statistics="sequential"))],
                              progress=False)
    first = [g.model.model.layers[0].self_attn.v_proj.weight for g in (dense, sequential)]
    second = [g.model.model.layers[1].self_attn.v_proj.weight for g in (dense, sequential)]  # OV is refitted
    assert torch.equal(first[0], first[1])
    assert not torch.equal(second[0], second[1])


class _Recorder(CalibratingStage):
    """Records the order of calls and how many rounds each layer took."""

    statistics = "sequential"

    def __init__(self, rounds: int) -> None:
        super().__init__()
        self.rounds, self.calls, self.seen = rounds, [], 0

    def observe(self, graph, index):
        layer = graph.model.model.layers[index]
        return [layer.register_forward_pre_hook(lambda module, args: setattr(self, "seen", self.seen + 1))]

    def process(self, graph, index):
        self.calls.append(index)
        return self.calls.count(index) < self.rounds


def test_a_stage_may_look_at_a_layer_again():
    recorder = _Recorder(rounds=3)
    run_pipeline(graph_of(tiny_llama(kv_heads=2)), tokens(), [recorder], progress=False)
    assert recorder.calls == [0, 0, 0, 1, 1, 1]
    assert recorder.seen == 2 * 3 * 2  # 2 layers × 3 rounds × 2 batches


def test_gptq_true_sequential_quantizes_groups_in_forward_order_from_remeasured_inputs():
    plain = apply_stage(graph_of(tiny_llama(kv_heads=2)), "gptq", windows=tokens(), bits=4, group_size=16)[0]
    sequential, metrics = apply_stage(graph_of(tiny_llama(kv_heads=2)), "gptq", windows=tokens(), bits=4,
                                      group_size=16, true_sequential=True)
    assert list(metrics["relative_error"][0]) == ["q+k+v", "o", "gate+up", "down"]
    q = [g.model.model.layers[0].self_attn.q_proj.qweight for g in (plain, sequential)]
    down = [g.model.model.layers[1].mlp.down_proj.qweight for g in (plain, sequential)]
    assert torch.equal(q[0], q[1])  # the first group sees the same inputs
    assert not torch.equal(down[0], down[1])


def test_layer_probe_works_for_gpt2_and_llama_and_restores_the_layer():
    for graph in (graph_of(tiny_llama(kv_heads=2)), describe(tiny_gpt2(), tokenizer=None, source="tiny")):
        windows = tokens()[:2]
        probe = LayerProbe(graph, windows)
        with torch.no_grad():
            reference = torch.log_softmax(graph.model(windows).logits.double(), -1)
        assert torch.allclose(probe.reference.double(), reference, atol=1e-5)
        down = [p for p in decoder_layers(graph.model, graph.family)[1].parameters() if p.dim() == 2][0]

        def zero_last_mlp():
            saved = down.detach().clone()
            down.data.zero_()
            return lambda: down.data.copy_(saved)

        assert probe.kl_after_change(1, lambda: (lambda: None)) == pytest.approx(0.0, abs=1e-6)  # float32 reference
        assert probe.kl_after_change(1, zero_last_mlp) > 0
        with torch.no_grad():
            assert torch.allclose(torch.log_softmax(graph.model(windows).logits.double(), -1), reference, atol=1e-5)


def test_dense_export_with_partial_groups_names_the_torch_backend():
    """48 inputs in groups of 32: gptqmodel's default CPU kernel would refuse them, its torch backend does not."""
    graph = describe(tiny_llama(kv_heads=2), tokenizer=None, source="tiny")
    apply_stage(graph, "gptq", windows=tokens(), bits=4, group_size=32)
    assert graph.model.config.quantization_config["backend"] == "gptq_torch"
    even = describe(tiny_llama(kv_heads=2), tokenizer=None, source="tiny")
    apply_stage(even, "gptq", windows=tokens(), bits=4, group_size=16)
    assert "backend" not in even.model.config.quantization_config


def test_gptq_splits_dense_gpt2_and_quantizes_every_projection():
    graph = describe(tiny_gpt2(), tokenizer=None, source="tiny")
    quantized, _ = apply_stage(graph, "gptq", windows=tokens(), bits=8, group_size=16)
    assert quantized.model.config.model_type == "a3q_gpt2"
    assert all(layer.quantized.keys() == {"q", "k", "v", "o", "up", "down"} for layer in quantized.layers)
