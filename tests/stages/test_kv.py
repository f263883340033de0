"""The kv stage: quantized-cache round trip, exact bytes, kv_ratio budgets, recipe rules, export/reload."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from a3q.cache import QuantizedKVCache
from a3q.cache.quantized import dequantize, quantize
from a3q.calib.sources import enwiki
from a3q.calib.windows import sequential_windows
from a3q.recipe import RecipeError, StageSpec, parse_recipe
from a3q.registry import StageConfig
from a3q.engine import apply_stage
from a3q.stages.kv import KVConfig, plan_kv_ranks


def _kv(graph, config: KVConfig):
    """The kv stage on a copy of ``graph`` (stages change the model in place, as in a run): (graph, report fields)."""
    windows = sequential_windows(graph.tokenizer, enwiki("calib"), 64, max_windows=2)
    return apply_stage(copy.deepcopy(graph), "kv", config, windows=windows)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim,size", [(-1, 51), (-1, 64), (-2, 64)])
def test_quantize_round_trip_error_is_half_a_step(bits, dim, size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, size) * torch.linspace(0.1, 8, size)  # channels of very different scales
    q = quantize(x, bits, 32, dim)
    y = dequantize(q, bits, 32, dim, size, torch.float32)
    assert q["codes"].dtype == torch.uint8 and q["codes"].shape[-1] == math.ceil(size * bits / 8)
    step = q["scale"].float().repeat_interleave(32, dim=-1)
    step = step[..., : x.shape[dim]].movedim(-1, dim)
    assert ((y - x).abs() <= step / 2 + 1e-6).all()
    # relative to each group's range, the error is at most 2^-bits (half a step of 2^bits − 1 levels)
    assert float((y - x).abs().max() / (x.amax() - x.amin())) <= 2.0**-bits


@pytest.mark.parametrize("bits,key_axis", [(8, "channel"), (4, "token"), (4, "channel")])
def test_generation_stores_what_the_graph_reports(smollm2, bits, key_axis):
    graph, _ = _kv(smollm2, KVConfig(bits=bits, group_size=16, residual=16, key_axis=key_axis))
    assert smollm2.kv_cache is None and getattr(smollm2.model.generation_config, "a3q_kv_cache", None) is None
    prompts = sequential_windows(smollm2.tokenizer, enwiki("test"), 40, max_windows=2)
    out = graph.model.generate(
        prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=6, min_new_tokens=6, do_sample=False,
        return_dict_in_generate=True, pad_token_id=smollm2.tokenizer.eos_token_id,
    )
    cache = out.past_key_values
    assert isinstance(cache, QuantizedKVCache) and cache.get_seq_length() == 45
    stored = cache.stored_bytes()
    assert stored["quantized_tokens"] == 16 and stored["residual_tokens"] == 45 - 16 < 16 + 16
    assert stored["quantized"] == 2 * stored["quantized_tokens"] * graph.kv_bytes_per_token()
    full_precision = 2 * stored["residual_tokens"] * 30 * 3 * 128 * 4
    assert stored["residual"] == full_precision
    values = 30 * 3 * 128
    meta = 30 * 3 * (4 * 64 / 16 + 4 * 64 / 16)  # scale+zero per 16 channels (values, token keys) or per 16 tokens
    assert graph.kv_bytes_per_token() == values * bits / 8 + meta
    assert graph.kv_cache_bits == bits


def test_kv_ratio_plans_hit_the_target():
    from a3q.graph import LayerStructure

    layer = LayerStructure(num_heads=9, num_kv_heads=3, head_dim=64, qk_head_dim=64, vo_head_dim=50, intermediate_size=1536)
    graph = SimpleNamespace(layers=[layer] * 3, uses_rope=True)
    for ratio in (0.1, 0.25, 0.3, 0.5, 0.7):
        for plan in plan_kv_ranks(graph, KVConfig(kv_ratio=ratio)):
            achieved = 1 - (plan.qk + plan.vo) / (64 + 50)
            assert plan.qk % 2 == 0 and plan.ff == 1536
            assert ratio - 1e-9 <= achieved <= ratio + 2 / (64 + 50)  # within one rank step, never short


def test_kv_ratio_stage_on_real_model(smollm2):
    graph, metrics = _kv(smollm2, KVConfig(kv_ratio=0.3, bits=8))
    assert metrics["ranks"] == {"qk": 44, "vo": 45}
    assert metrics["kv_rank_reduction"] == pytest.approx(1 - 89 / 128)
    assert all(layer.intermediate_size == 1536 and layer.qk_head_dim == 44 for layer in graph.layers)
    assert metrics["kv_bytes_per_layer"] == graph.kv_bytes_per_layer() and len(metrics["kv_bytes_per_layer"]) == 30
    assert sum(metrics["kv_bytes_per_layer"]) == graph.kv_bytes_per_token()
    assert metrics["kv_bytes_per_token_before"] == 30 * 3 * 128 * 4
    assert graph.kv_cache["bits"] == 8 and graph.decoder_linear_params() < smollm2.decoder_linear_params()
    window = sequential_windows(smollm2.tokenizer, enwiki("test"), 32, max_windows=1)
    with torch.no_grad():
        assert torch.isfinite(graph.model(window).logits).all()


def _problems(stages: list[dict]) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"model": "smollm2-135m", "stages": stages})
    return caught.value.problems


def test_recipe_validation_of_fields():
    assert _problems([{"stage": "kv", "bits": 3}])[0].startswith("stages[0] (kv): bits:")
    assert _problems([{"stage": "kv", "kv_ratio": 1.0}])[0].startswith("stages[0] (kv): kv_ratio:")
    assert _problems([{"stage": "kv"}]) == ["stages[0] (kv): nothing to do: set kv_ratio, qk_rank/vo_rank and/or bits"]
    assert _problems([{"stage": "kv", "kv_ratio": 0.3, "qk_rank": 32}]) == [
        "stages[0] (kv): kv_ratio: give either kv_ratio or explicit qk_rank/vo_rank, not both"
    ]
    assert _problems([{"stage": "kv", "kv_ratio": 0.3, "residual": 64}]) == [
        "stages[0] (kv): residual: only meaningful for a quantized cache; set bits (4 or 8)"
    ]
    assert _problems([{"stage": "kv", "bits": 8, "key_axis": "head"}])[0].startswith("stages[0] (kv): key_axis:")


def test_recipe_a3_kv_rule():
    a3 = {"stage": "a3", "qk_rank": 48, "vo_rank": 48, "ff_rank": 1024}
    assert _problems([a3, {"stage": "kv", "qk_rank": 56, "vo_rank": 40}]) == [
        "stages[1] (kv): qk_rank: 56 exceeds the qk_rank 48 that stages[0] (a3) leaves"
    ]
    assert _problems([{"stage": "kv", "bits": 8}, {"stage": "kv", "bits": 4}]) == [
        "stages[1] (kv): bits: the cache is already quantized by stages[0] (kv); set bits in one kv stage"
    ]
    ok = parse_recipe({"model": "smollm2-135m", "stages": [a3, {"stage": "kv", "kv_ratio": 0.3, "bits": 8}]})
    assert [spec.name for spec in ok.stages] == ["a3", "kv"]

    class Quantizer(StageConfig):
        produces_quantized_weights = True

    earlier = [StageSpec(index=0, name="gptq", config=Quantizer())]
    assert KVConfig(bits=8).check_in_recipe(earlier) == []
    (problem,) = KVConfig(kv_ratio=0.2).check_in_recipe(earlier)
    assert "needs float weights" in problem and "stages[0] (gptq)" in problem


def test_export_reload_keeps_the_cache_setting(smollm2, tmp_path):
    from a3q.io.artifact import save_artifact
    from a3q.io.loading import load_graph

    graph, _ = _kv(smollm2, KVConfig(bits=4, residual=8, group_size=16))
    path = save_artifact(graph, tmp_path / "kv4", recipe=None, report=[])
    manifest = json.loads((path / "a3q.json").read_text())
    assert manifest["structure"]["kv_cache"] == graph.kv_cache
    assert json.loads((path / "generation_config.json").read_text())["a3q_kv_cache"] == graph.kv_cache
    reloaded = load_graph(path)
    assert reloaded.kv_cache == graph.kv_cache and reloaded.kv_cache_bits == 4
    assert reloaded.kv_bytes_per_token() == graph.kv_bytes_per_token()
    prompt = sequential_windows(smollm2.tokenizer, enwiki("test"), 24, max_windows=1)
    out = reloaded.model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, do_sample=False,
        return_dict_in_generate=True, pad_token_id=smollm2.tokenizer.eos_token_id,
    )
    assert isinstance(out.past_key_values, QuantizedKVCache)
    # and in a fresh process that cannot import a3q, through the cache shipped as remote code
    script = (
        "import sys; sys.modules['a3q'] = None\n"
        "import torch; from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "ids = torch.arange(100, 124)[None]\n"
        "out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,"
        " return_dict_in_generate=True, pad_token_id=2)\n"
        "print(type(out.past_key_values).__name__, out.past_key_values.stored_bytes()['quantized_tokens'])\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", script, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["QuantizedKVCache", "16"]
