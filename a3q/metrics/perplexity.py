"""Perplexity over non-overlapping token windows.

Protocol: each window of ``seq_len`` tokens is scored independently (no context carried across
windows, no BOS added); every token after the first of a window is predicted, so a window
contributes ``seq_len - 1`` predictions. Perplexity is ``exp(total NLL / total predictions)``
over all windows. A non-finite loss is an error: silently dropping a window would flatter a
broken model.

With ``cache_chunk`` the window is fed in chunks of that many tokens through a KV cache (the
model's own: a quantized one when the model carries that setting, see :mod:`a3q.cache`), so every
chunk attends to keys and values read back from the cache, as in generation. With a
full-precision cache this equals the plain evaluation up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from a3q import distributed
from a3q.cache import new_cache


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


def chunked_window_nll(model: torch.nn.Module, batch: torch.Tensor, chunk: int, make_cache: Callable[[], Any]) -> torch.Tensor:
    """Like :func:`window_nll`, feeding ``chunk`` tokens at a time through a fresh cache per batch.

    Positions come from the cache length, so chunk ``c`` sees tokens ``[0, c·chunk)`` only through the cache.
    The last logit of a chunk predicts the first token of the next one.
    """
    cache = make_cache()
    totals = torch.zeros(batch.shape[0], dtype=torch.float64, device=batch.device)
    length = batch.shape[1]
    for start in range(0, length, chunk):
        logits = model(input_ids=batch[:, start : start + chunk], past_key_values=cache, use_cache=True).logits
        targets = batch[:, start + 1 : start + chunk + 1]
        for row, (window_logits, window_targets) in enumerate(zip(logits, targets)):
            predicted = window_logits[: window_targets.shape[0]].double()
            totals[row] += F.cross_entropy(predicted, window_targets, reduction="sum")
    return totals


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    description: str = "perplexity",
    cache_chunk: int | None = None,
    make_cache: Callable[[], Any] | None = None,
    across_processes: bool = False,
    layerwise: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` ([n, seq_len] token ids).

    ``cache_chunk``: feed each window in chunks of this many tokens through a KV cache (``make_cache()``, by
    default the model's own cache from :func:`a3q.cache.new_cache`) instead of in one forward pass.
    ``across_processes``: in a data-parallel run (:mod:`a3q.distributed`) each process scores its contiguous share
    of ``windows`` in whole batches (a process may get none) and the NLL sums and prediction counts are summed over
    the processes, so every process returns the perplexity of all ``windows``; a non-finite loss on any process fails
    them all.
    ``layerwise``: score all (this process's) windows at once with this function instead (an offloaded model:
    :func:`a3q.metrics.layerwise.layerwise_window_nll`).
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError("windows must have shape [n, seq_len] with seq_len >= 2")
    if cache_chunk is not None and cache_chunk < 1:
        raise ValueError("cache_chunk must be >= 1")
    if cache_chunk is not None and make_cache is None:
        make_cache = lambda: new_cache(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    all_windows, offset, bad_windows = windows, 0, []
    if across_processes and distributed.world_size() > 1:
        # whole batches, the one-process run's: each window's NLL then comes from the same GEMMs in every world size
        share = distributed.WindowShares(windows.shape[0], batch_size, distributed.world_size()).windows_of(
            distributed.rank())
        offset, windows = share.start, windows[share]
        progress = progress and distributed.is_main()
    nll_sum = 0.0
    for start, nll in _scored_batches(model, windows, batch_size, device, cache_chunk, make_cache, layerwise,
                                      tqdm_args={"desc": description, "disable": not progress}):
        if not torch.isfinite(nll).all():
            bad_windows += (~torch.isfinite(nll)).nonzero().flatten().add(start + offset).tolist()
            if windows is all_windows:  # one process: fail at once
                break
            continue
        nll_sum += float(nll.sum())
    model.train(was_training)
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    if windows is not all_windows:  # exact sums over the processes: float64 NLL, integer counts below 2⁵³
        totals = distributed.all_reduce_sum(torch.tensor([nll_sum, float(predicted), float(len(bad_windows))],
                                                         dtype=torch.float64))
        nll_sum, predicted, bad = float(totals[0]), int(totals[1]), int(totals[2])
        if bad and not bad_windows:
            bad_windows = [f"{bad} on other processes"]
    if bad_windows:
        raise NonFiniteLossError(f"non-finite loss in window(s) {bad_windows}: the model's output is broken")
    return PerplexityResult(
        perplexity=math.exp(nll_sum / predicted),
        nll_sum=nll_sum,
        predicted_tokens=predicted,
        windows=int(all_windows.shape[0]),
    )


def _scored_batches(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                    cache_chunk: int | None, make_cache: Callable[[], Any] | None,
                    layerwise: Callable[[torch.Tensor], torch.Tensor] | None, tqdm_args: dict[str, Any]):
    """``(first window, NLL per window)`` batch by batch; one batch of everything when scored ``layerwise``."""
    if layerwise is not None:
        if windows.shape[0]:
            yield 0, layerwise(windows)
        return
    for start in tqdm(range(0, windows.shape[0], batch_size), unit="batch", leave=False, **tqdm_args):
        batch = windows[start : start + batch_size].to(device)
        if cache_chunk is None:
            yield start, window_nll(model, batch)
        else:
            yield start, chunked_window_nll(model, batch, cache_chunk, make_cache)
