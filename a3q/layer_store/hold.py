"""Holding a decoder layer: the one way every stage, probe, evaluation and export touches a layer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from a3q.arch import decoder_layers
from a3q.graph import ModelGraph


@contextmanager
def hold_layer(graph: ModelGraph, index: int) -> Iterator[nn.Module]:
    """Decoder layer ``index`` of ``graph``'s model, in memory for the duration (read from its files first when the
    model is offloaded, and released after the outermost hold; a no-op for a model in memory). A stage that changes
    the held layer says so with ``graph.layer_store.mark_changed(graph, index)``."""
    with graph.layer_store.materialized(graph, index):
        yield decoder_layers(graph.model, graph.family)[index]
