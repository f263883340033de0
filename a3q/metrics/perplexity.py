"""Perplexity over non-overlapping token windows.

Protocol: each window of ``seq_len`` tokens is scored independently (no context carried across
windows, no BOS added); every token after the first of a window is predicted, so a window
contributes ``seq_len - 1`` predictions. Perplexity is ``exp(total NLL / total predictions)``
over all windows. A non-finite loss is an error: silently dropping a window would flatter a
broken model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


class NonFiniteLossError(RuntimeError):
    """A window produced a NaN or infinite loss."""


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity with the counts it was computed from."""

    perplexity: float
    nll_sum: float
    predicted_tokens: int
    windows: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.predicted_tokens


def window_nll(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of each window in ``batch`` (shape [b]).

    The log-softmax is taken in float64, one window at a time: in float32 it drifts by ~1e-4
    relative over a 49k vocabulary, which is larger than the effects a3q's tests compare.
    """
    logits = model(input_ids=batch, use_cache=False).logits
    totals = []
    for window_logits, window in zip(logits, batch):
        predicted = window_logits[:-1].double()
        totals.append(F.cross_entropy(predicted, window[1:], reduction="sum"))
    return torch.stack(totals)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    description: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` ([n, seq_len] token ids)."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError("windows must have shape [n, seq_len] with seq_len >= 2")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc=description, unit="batch", disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        nll = window_nll(model, batch)
        if not torch.isfinite(nll).all():
            bad = (~torch.isfinite(nll)).nonzero().flatten().add(start).tolist()
            raise NonFiniteLossError(f"non-finite loss in window(s) {bad}: the model's output is broken")
        nll_sum += float(nll.sum())
    model.train(was_training)
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    return PerplexityResult(
        perplexity=math.exp(nll_sum / predicted),
        nll_sum=nll_sum,
        predicted_tokens=predicted,
        windows=int(windows.shape[0]),
    )
