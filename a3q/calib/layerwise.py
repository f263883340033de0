"""The layer-by-layer calibration pass that several stages can share.

GPTQ needs every layer's inputs to come from the layers before it *as already compressed*; A³ needs second
moments of each layer's activations. Running them as two stages would push the calibration windows through the
model twice. Instead a stage may offer a :class:`LayerwiseStage` (registered with
:func:`a3q.registry.register_layerwise`) and the engine runs consecutive such stages in ONE pass:

1. the windows are embedded once and the inputs of decoder layer 0 are captured (with the keyword arguments the
   model passes its layers: masks, position embeddings), batch by batch;
2. for each layer, for each stage in recipe order: the stage hooks what it needs (:meth:`~LayerwiseStage.observe`),
   the layer runs over the captured inputs, then the stage changes the layer (:meth:`~LayerwiseStage.process`):
   A³ shrinks it, GPTQ quantizes the shrunk layer's linears from Hessians of the shrunk layer's inputs;
3. the finished layer runs once more to produce the next layer's inputs, so every later observation sees the
   compressed (and quantized) model upstream;
4. each stage's :meth:`~LayerwiseStage.finish` updates the graph's description and reports its metrics.

Only one layer's statistics exist at a time, and no stage ever runs the full model over the data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from a3q.arch import LAYER_PREFIX, decoder_layers
from a3q.graph import ModelGraph
from a3q.numerics import check_activations_finite, check_module_finite


class LayerwiseStage:
    """One stage's part in the shared pass; subclasses override what they need."""

    #: the stage's name, for progress bars and errors
    name: str = "stage"

    def __init__(self) -> None:
        self.seconds = 0.0  # time spent in this stage's observation forwards and processing
        self.metrics: dict[str, Any] = {}

    def begin(self, graph: ModelGraph) -> ModelGraph:
        """Before the pass (e.g. convert the model class); returns the graph the pass runs on."""
        return graph

    def observe(self, graph: ModelGraph, index: int) -> list[Any]:
        """Register hooks on layer ``index`` that record what :meth:`process` needs; returns the handles."""
        return []

    def process(self, graph: ModelGraph, index: int) -> None:
        """Change layer ``index`` in place, from what the hooks recorded."""

    def finish(self, graph: ModelGraph) -> ModelGraph:
        """After the pass: update the graph's description; fill :attr:`metrics`."""
        return graph


@dataclass
class CapturedInputs:
    """Decoder-layer inputs per batch: hidden states plus the keyword arguments the model passed."""

    hidden: list[Tensor] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(graph: ModelGraph, windows: Tensor, batch_size: int) -> CapturedInputs:
    """Run the embeddings only and keep what decoder layer 0 receives, batch by batch."""
    captured = CapturedInputs()
    first = decoder_layers(graph.model, graph.family)[0]

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden)
        captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(graph.model.parameters()).device
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                graph.model.base_model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _run_layer(layer: torch.nn.Module, inputs: CapturedInputs) -> list[Tensor]:
    outputs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
        out = layer(hidden, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


@torch.no_grad()
def run_layerwise(
    graph: ModelGraph, windows: Tensor, stages: list[LayerwiseStage], batch_size: int = 4, progress: bool = True,
    after_finish: Callable[[LayerwiseStage, ModelGraph], None] | None = None,
) -> ModelGraph:
    """Run ``stages`` through one layer-by-layer pass over ``windows`` (see the module docstring).

    ``after_finish(stage, graph)`` is called after each stage's :meth:`~LayerwiseStage.finish`, in recipe order,
    so the engine can record a report row per stage.
    """
    for stage in stages:
        started = time.perf_counter()
        graph = stage.begin(graph)
        stage.seconds += time.perf_counter() - started
    inputs = capture_layer_inputs(graph, windows, batch_size)
    names = "+".join(stage.name for stage in stages)
    for index in tqdm(range(len(graph.layers)), desc=f"{names} (layer by layer)", disable=not progress, leave=False):
        for stage in stages:
            started = time.perf_counter()
            handles = stage.observe(graph, index)
            if handles:
                try:
                    _run_layer(decoder_layers(graph.model, graph.family)[index], inputs)
                finally:
                    for handle in handles:
                        handle.remove()
            stage.process(graph, index)
            stage.seconds += time.perf_counter() - started
            layer = decoder_layers(graph.model, graph.family)[index]
            check_module_finite(layer, f"{stage.name}, layer {index}", prefix=LAYER_PREFIX[graph.family].format(index=index))
        inputs.hidden = _run_layer(decoder_layers(graph.model, graph.family)[index], inputs)
        check_activations_finite(inputs.hidden, f"{names}: output of layer {index}")
    for stage in stages:
        started = time.perf_counter()
        graph = stage.finish(graph)
        stage.seconds += time.perf_counter() - started
        if after_finish is not None:
            after_finish(stage, graph)
    return graph
