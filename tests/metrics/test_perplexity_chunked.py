"""Perplexity with the KV cache in the loop: chunked feeding equals the plain evaluation with a full-precision
cache, and a quantized cache is really read back (its result moves, by about what its bit width allows)."""

from __future__ import annotations

import pytest

from a3q.cache import QuantizedKVCache
from a3q.calib.sources import enwiki
from a3q.calib.windows import sequential_windows
from a3q.metrics.perplexity import perplexity
from a3q.recipe import RecipeError, parse_recipe


@pytest.fixture(scope="module")
def windows(smollm2):
    return sequential_windows(smollm2.tokenizer, enwiki("test"), 256, max_windows=2)


@pytest.fixture(scope="module")
def plain(smollm2, windows):
    return perplexity(smollm2.model, windows, batch_size=2, progress=False)


@pytest.mark.parametrize("chunk", [64, 100])
def test_full_precision_chunked_equals_plain(smollm2, windows, plain, chunk):
    chunked = perplexity(smollm2.model, windows, batch_size=2, progress=False, cache_chunk=chunk)
    assert chunked.predicted_tokens == plain.predicted_tokens == 2 * 255
    assert chunked.nll_sum == pytest.approx(plain.nll_sum, rel=1e-5)
    assert chunked.perplexity == pytest.approx(plain.perplexity, rel=1e-5)


def test_quantized_cache_is_read_back(smollm2, windows, plain):
    """residual 0: every earlier chunk is seen only through the quantized store, so 4 bits must move the result."""

    def run(bits: int) -> float:
        make = lambda: QuantizedKVCache(30, bits=bits, group_size=16, residual=0, key_axis="token")
        return perplexity(smollm2.model, windows, batch_size=2, progress=False, cache_chunk=64, make_cache=make).perplexity

    eight, four = run(8), run(4)
    assert eight == pytest.approx(plain.perplexity, rel=0.01)
    assert abs(four - plain.perplexity) > abs(eight - plain.perplexity)
    assert four == pytest.approx(plain.perplexity, rel=0.25)


def test_cache_chunk_is_validated():
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "evaluate", "cache_chunk": 0}]})
    assert caught.value.problems[0].startswith("stages[0] (evaluate): cache_chunk:")
    config = parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "evaluate", "cache_chunk": 64}]}).stages[0].config
    assert config.cache_chunk == 64
