"""On a CUDA GPU: the suite's pinned protocol (tests/test_pinned_results.py) on cuda, and bitsandbytes on cuda.

Skipped without CUDA (``pytest -m gpu`` selects only these; on a CPU machine they are all skipped). Float32 on a GPU
sums in another order than on a CPU, so A³'s and the dense perplexities must match the CPU pins closely; GPTQ's codes
flip where a rounding does (the CPU pin itself moves 8% between one and two threads), so A³ + GPTQ gets a band.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests import test_pinned_results as pinned

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DENSE = pinned.DENSE
A3_20 = pinned.PINNED["a3 20%"][1]
A3_20_GPTQ_4BIT_G64 = pinned.PINNED["a3 20% (sequential) + gptq 4-bit g64, float64"][1]


@pytest.fixture(scope="module")
def on_cuda():
    from a3q.io.loading import load_graph

    graph = load_graph("smollm2-135m", "float32", device="cuda")
    assert next(graph.model.parameters()).device.type == "cuda"
    return graph


@pytest.fixture(scope="module")
def windows(on_cuda):
    return pinned.pinned_windows(on_cuda.tokenizer)


def _ppl(graph, test):
    from a3q.metrics.perplexity import perplexity

    return perplexity(graph.model, test, progress=False).perplexity


def test_dense_perplexity_on_cuda(on_cuda, windows):
    assert _ppl(on_cuda, windows[1]) == pytest.approx(DENSE, rel=1e-3)


def test_a3_20_on_cuda_matches_the_cpu_pin(on_cuda, windows):
    from a3q.engine import apply_stages

    graph, _ = apply_stages(copy.deepcopy(on_cuda), [("a3", {"allocation": "uniform", "ratio": 0.2})], windows=windows[0])
    assert next(graph.model.parameters()).device.type == "cuda"
    assert _ppl(graph, windows[1]) == pytest.approx(A3_20, rel=1e-2)


def test_a3_20_and_gptq_4bit_on_cuda(on_cuda, windows):
    from a3q.engine import apply_stages

    stages = [("a3", {"allocation": "uniform", "ratio": 0.2, "statistics": "sequential"}), ("gptq", {"bits": 4, "group_size": 64})]
    graph, (a3_metrics, gptq_metrics) = apply_stages(copy.deepcopy(on_cuda), stages, windows=windows[0])
    assert all(buffer.device.type == "cuda" for buffer in graph.model.buffers())
    assert _ppl(graph, windows[1]) == pytest.approx(A3_20_GPTQ_4BIT_G64, rel=0.15)


def test_a_recipe_runs_on_cuda_end_to_end(tmp_path):
    from a3q.engine import run_recipe
    from a3q.recipe import parse_recipe

    recipe = parse_recipe({
        "model": "smollm2-135m", "device": "cuda", "dtype": "auto",
        "calibration": {"windows": 8, "seq_len": 256},
        "stages": [{"stage": "a3", "allocation": "uniform", "ratio": 0.2}, {"stage": "gptq", "bits": 4, "group_size": 64},
                   {"stage": "evaluate", "seq_len": 256, "max_windows": 4},
                   {"stage": "export", "path": str(tmp_path / "artifact")}, {"stage": "reload"},
                   {"stage": "evaluate", "seq_len": 256, "max_windows": 4}],
    })
    result = run_recipe(recipe, tmp_path / "run", show_table=False)
    context = result.report.context
    assert context["device"] == "cuda:0" and context["dtype"] == "float32"  # SmolLM2's config says float32
    assert context["memory_estimate"]["device_total"] > 0
    rows = [row for row in result.report.rows if "ppl" in row]
    assert rows[0]["ppl"] == pytest.approx(rows[1]["ppl"], rel=1e-3)  # the reloaded artifact on cuda
    assert next(result.graph.model.parameters()).device.type == "cuda"


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_bnb_on_cuda(on_cuda, windows, quant_type):
    from a3q.engine import apply_stage

    graph, _ = apply_stage(copy.deepcopy(on_cuda), "bnb", quant_type=quant_type)
    assert next(graph.model.parameters()).device.type == "cuda"
    assert _ppl(graph, windows[1]) == pytest.approx(DENSE, rel=0.1)  # 4/8-bit: close to the dense model


def test_bfloat16_auto_on_cuda_loads_in_the_recipes_dtype():
    from a3q.io.loading import load_graph

    graph = load_graph("smollm2-135m", "bfloat16", device="cuda:0")
    parameter = next(graph.model.parameters())
    assert parameter.device == torch.device("cuda:0") and parameter.dtype == torch.bfloat16
