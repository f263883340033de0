"""A³ on the real SmolLM2-135M with real Wikipedia: identity at full rank, quality vs ratio,
ablations, incremental decoding and a remote-code round trip.

Calibration: 16 windows × 512 tokens of enwiki/calib (seed 0; the README's reduced protocol), collected once
for the module.
Evaluation: the first 8 windows × 512 tokens of enwiki/test (README numbers use more windows).
"""

from __future__ import annotations

import json

import pytest
import torch

from a3q.calib.sources import enwiki

from a3q.calib.windows import random_windows, sequential_windows
from a3q.io.artifact import save_artifact
from a3q.metrics.perplexity import perplexity
from a3q.stages.a3.apply import as_a3_graph, compress_model
from a3q.stages.a3.ranks import LayerRanks, plan_ranks
from a3q.stages.a3.statistics import collect_statistics
from tests.remote_code import remote_code_logits

ALL = frozenset({"qk", "ov", "mlp"})


@pytest.fixture(scope="module")
def calibrated(smollm2):
    graph = as_a3_graph(smollm2)
    windows = random_windows(graph.tokenizer, enwiki("calib"), 512, 16, seed=0)
    return graph, collect_statistics(graph, windows, set(ALL), progress=False)


@pytest.fixture(scope="module")
def test_windows(smollm2):
    return sequential_windows(smollm2.tokenizer, enwiki("test"), 512, max_windows=8)


def _compress(calibrated, ratios: dict, components=ALL):
    graph, stats = calibrated
    plans = plan_ranks(graph.layers, ratios, {}, 1, rope=True)
    return compress_model(graph, stats, plans, 1e-6, frozenset(components), progress=False)[0]


@pytest.fixture(scope="module")
def compressed_20(calibrated):
    return _compress(calibrated, {"qk": 0.2, "ov": 0.2, "mlp": 0.2})


def test_full_rank_reproduces_dense_logits(smollm2, calibrated, test_windows):
    graph, stats = calibrated
    full = [LayerRanks(qk=64, vo=64, ff=1536)] * 30
    rebuilt, _ = compress_model(graph, stats, full, 1e-6, ALL, progress=False)
    probe = test_windows[:2, :128]
    with torch.no_grad():
        expected = smollm2.model(input_ids=probe).logits
        actual = rebuilt.model(input_ids=probe).logits
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_quality_degrades_monotonically_and_components_alone_hurt_less(smollm2, calibrated, test_windows):
    test_windows = test_windows[:2]  # seven evaluations: a quarter of the module's windows keeps the suite's budget
    dense = perplexity(smollm2.model, test_windows, progress=False).perplexity
    by_ratio = {}
    for ratio in (0.1, 0.2, 0.3):
        model = _compress(calibrated, {"qk": ratio, "ov": ratio, "mlp": ratio}).model
        by_ratio[ratio] = perplexity(model, test_windows, progress=False).perplexity
    alone = {}
    for component in ("qk", "ov", "mlp"):
        model = _compress(calibrated, {component: 0.1}, components={component}).model
        alone[component] = perplexity(model, test_windows, progress=False).perplexity
    print(json.dumps({"dense": dense, "all": by_ratio, "alone_0.1": alone}, indent=1))
    assert all(torch.isfinite(torch.tensor(list(by_ratio.values()))))
    assert dense < by_ratio[0.1] < by_ratio[0.2] < by_ratio[0.3]
    assert all(dense < value < by_ratio[0.1] for value in alone.values())
    # far worse than the paper-style magnitudes (×1.3 / ×1.8 / ×2.8 of dense) would mean a bug
    assert by_ratio[0.1] < 1.6 * dense and by_ratio[0.2] < 2.4 * dense and by_ratio[0.3] < 4.0 * dense


def test_compressed_model_sizes(compressed_20):
    layer = compressed_20.layers[0]
    assert (layer.qk_head_dim, layer.vo_head_dim, layer.intermediate_size) == (50, 51, 1228)
    assert len(layer.rope_pairs) == 3 and all(len(p) == 25 for p in layer.rope_pairs)
    assert compressed_20.kv_bytes_per_token() == 30 * 3 * (50 + 51) * 4
    linear = sum(m.weight.numel() for n, m in compressed_20.model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert compressed_20.decoder_linear_params() == linear


def test_incremental_decoding_matches_full_forward(compressed_20, test_windows):
    model = compressed_20.model
    ids = test_windows[:1, :24]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        prefill = model(input_ids=ids[:, :16], use_cache=True)
        cache, steps = prefill.past_key_values, [prefill.logits]
        for position in range(16, 24):
            out = model(input_ids=ids[:, position : position + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max() <= 1e-4 * full.abs().max()
    generated = model.generate(ids[:, :16], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 20)


def test_export_reloads_in_fresh_process_with_remote_code(compressed_20, test_windows, tmp_path):
    path = save_artifact(compressed_20, tmp_path / "a3-20", recipe=None, report=[])
    assert (path / "modeling_a3q_llama.py").is_file()
    probe = test_windows[:1, :64]
    with torch.no_grad():
        expected = compressed_20.model(input_ids=probe).logits
    assert torch.equal(remote_code_logits(path, probe, "A3LlamaForCausalLM"), expected)
