"""Token windows: non-overlapping, in order for evaluation, seeded for calibration."""

from __future__ import annotations

import pytest
import torch

from a3q.calib.sources import enwiki

from a3q.calib.tokens import token_stream
from a3q.calib.windows import random_windows, sequential_windows


def test_sequential_windows_tile_the_stream(tokenizer):
    stream = token_stream(tokenizer, enwiki("test"))
    assert 120_000 < stream.numel() < 145_000
    windows = sequential_windows(tokenizer, enwiki("test"), 512, max_windows=3)
    assert windows.shape == (3, 512)
    assert torch.equal(windows.flatten(), stream[: 3 * 512])


def test_random_windows_are_seeded_distinct_and_from_the_split(tokenizer):
    first = random_windows(tokenizer, enwiki("calib"), 256, 8, seed=0)
    again = random_windows(tokenizer, enwiki("calib"), 256, 8, seed=0)
    other = random_windows(tokenizer, enwiki("calib"), 256, 8, seed=1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len({tuple(w.tolist()) for w in first}) == 8
    all_windows = {tuple(w.tolist()) for w in sequential_windows(tokenizer, enwiki("calib"), 256)}
    assert all(tuple(w.tolist()) in all_windows for w in first)


def test_too_many_windows_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="has only"):
        random_windows(tokenizer, enwiki("test"), 100_000, 2, seed=0)
