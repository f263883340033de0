"""Perplexity of an offloaded model: layer by layer over all windows instead of window by window through the model.

Why: with decoder layers on disk (:mod:`a3q.layer_store.offloaded`) a window-by-window forward would read every layer
once per batch. Here each layer is read once: all windows' hidden states go through layer 0, then layer 1, and so on (the
calibration pipeline's own capture and layer runner), and the final norm and LM head score each batch at the end.
The NLL is the same sum as :func:`a3q.metrics.perplexity.window_nll`'s (float64 log-softmax, one window at a time).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from a3q.arch import lm_logits
from a3q.graph import ModelGraph
from a3q.layer_store.hold import hold_layer
from a3q.pipeline.runner import capture_layer_inputs, run_layer


@torch.no_grad()
def layerwise_window_nll(graph: ModelGraph, windows: Tensor, batch_size: int, progress: bool = True,
                         description: str = "perplexity (layer by layer)") -> Tensor:
    """Summed next-token NLL of each window (shape ``[n]``, float64)."""
    inputs = capture_layer_inputs(graph, windows, batch_size)
    for index in tqdm(range(len(graph.layers)), desc=description, disable=not progress, leave=False):
        with hold_layer(graph, index) as layer:
            inputs = inputs.with_hidden(run_layer(layer, index, inputs))
    totals = []
    for hidden, start in zip(inputs.hidden, range(0, windows.shape[0], batch_size)):
        logits = lm_logits(graph.model, graph.family, hidden)
        for window_logits, window in zip(logits, windows[start : start + batch_size].to(logits.device)):
            totals.append(F.cross_entropy(window_logits[:-1].double(), window[1:], reduction="sum"))
    return torch.stack(totals)


def layerwise_scorer(graph: ModelGraph, batch_size: int, progress: bool = True,
                     description: str = "perplexity (layer by layer)") -> Callable[[Tensor], Tensor] | None:
    """What :func:`a3q.metrics.perplexity.perplexity` scores windows with (its ``layerwise``): layer by layer when the
    graph's layer store asks for it (an offloaded model), else None (window by window through the model)."""
    if not graph.layer_store.layer_by_layer:
        return None
    return lambda windows: layerwise_window_nll(graph, windows, batch_size, progress=progress, description=description)
