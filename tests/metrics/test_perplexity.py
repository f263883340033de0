"""Perplexity equals a hand computation and refuses non-finite losses."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from a3q.calib.sources import enwiki

from a3q.calib.windows import sequential_windows
from a3q.metrics.perplexity import NonFiniteLossError, perplexity


def test_perplexity_matches_hand_computation_on_real_model(smollm2):
    windows = sequential_windows(smollm2.tokenizer, enwiki("test"), 48, max_windows=3)
    result = perplexity(smollm2.model, windows, batch_size=2, progress=False)
    nll = 0.0
    count = 0
    with torch.no_grad():  # the same batches of 2 (float32 GEMMs round by shape), log-sum-exp written out in float64
        for start in range(0, len(windows), 2):
            batch = windows[start : start + 2]
            for logits, window in zip(smollm2.model(input_ids=batch).logits[:, :-1].double(), batch):
                top = logits.max(dim=-1, keepdim=True).values
                log_norm = (logits - top).exp().sum(dim=-1).log() + top[:, 0]
                picked = logits[torch.arange(window.numel() - 1), window[1:]]
                nll += float((log_norm - picked).sum())
                count += window.numel() - 1
    assert result.predicted_tokens == count == 3 * 47
    assert result.windows == 3
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-9)
    assert 5 < result.perplexity < 60  # a real language model on real prose


class _BrokenModel(torch.nn.Module):
    """Returns NaN logits for the second window only."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, 11)
        logits[1:] = float("nan")
        return SimpleNamespace(logits=logits)


def test_non_finite_loss_is_an_error_naming_the_window():
    windows = torch.randint(0, 11, (3, 8))
    with pytest.raises(NonFiniteLossError, match=r"window\(s\) \[1, 2\]"):
        perplexity(_BrokenModel(), windows, batch_size=3, progress=False)


def test_uniform_model_has_perplexity_of_vocabulary_size():
    class Uniform(_BrokenModel):
        def forward(self, input_ids, use_cache=False):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 11))

    result = perplexity(Uniform(), torch.randint(0, 11, (2, 5)), progress=False)
    assert result.perplexity == pytest.approx(11.0)
    assert result.predicted_tokens == 8
