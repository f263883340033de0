"""The calibration pipeline: the only code in a3q that runs a model over calibration windows.

One pass, layer by layer, for every calibrating stage of a group at once:

1. the windows are embedded once and what decoder layer 0 receives is captured (hidden states plus the keyword
   arguments the model passes its layers: masks, position embeddings), batch by batch;
2. stages that **plan** (A³'s global allocation) first observe every layer of the model as it enters the pass, then
   plan, with a :class:`LayerProbe` that measures trial changes;
3. for each layer, for each stage in recipe order: the stage's hooks are registered, the layer runs over the stage's
   inputs, the hooks are removed and the stage changes the layer. A ``dense`` stage's inputs come from its own
   stream (the layers before, as that stage found them: one whole-model forward of the model entering the stage);
   a ``sequential`` stage's from the layers before as already finished by every stage in the pass;
4. the finished layer runs once more on the sequential stream (when a sequential stage needs it), and its weights
   and outputs are checked for non-finite values, naming the layer;
5. each stage's ``finish`` updates the graph's description.

With a :class:`~a3q.checkpoint.layer_pass.PassCheckpoint`, the pass saves itself after planning and after every few layers
(finished layers, each stream's next inputs, stage states) and, when resuming, continues from the saved layer; signals
that arrive while a layer is being processed stop the pass after it, with a checkpoint.

Data-parallel runs (:mod:`a3q.distributed`): each process observes its shard of the windows (whole batches of the
pass's batch size, so each process runs exactly the forwards one process would run on those windows); after each
observation of a layer (and, for planners, after observing every layer) each stage's
:meth:`~a3q.pipeline.stage.CalibratingStage.reduce_statistics` sums its statistics over the processes before
``process``/``plan`` reads them, and after each layer :func:`a3q.distributed.check_identical` checks that every
process holds the same layer. Device placement and offloading belong here too, once, for every stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from a3q import distributed
from a3q.arch import LAYER_PREFIX, decoder_layers, lm_logits
from a3q.graph import ModelGraph
from a3q.layer_store.hold import hold_layer
from a3q.numerics import check_activations_finite, check_module_finite
from a3q.pipeline.stage import CalibratingStage, StopLayer

if TYPE_CHECKING:
    from a3q.checkpoint.layer_pass import PassCheckpoint


@dataclass
class CapturedInputs:
    """Decoder-layer inputs per batch: hidden states plus, per layer, the keyword arguments the model passes it.

    Why per layer: models give different layers different masks and rotary embeddings (Gemma's sliding-window and
    global layers, each with its own RoPE base), so what layer 0 receives is not what layer 7 receives. The dicts of
    one batch share their tensors; only the hidden states differ between streams.
    """

    hidden: list[Tensor] = field(default_factory=list)
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)  # [batch][layer]

    def with_hidden(self, hidden: list[Tensor]) -> CapturedInputs:
        return CapturedInputs(hidden=hidden, kwargs=self.kwargs)


class _LayerInputRecorder(torch.nn.Module):
    """Stands in for decoder layer ``index`` while inputs are captured: records what the model passes the layer and
    returns the hidden states unchanged, so capturing costs the embeddings only (and works with offloaded layers)."""

    def __init__(self, layer: torch.nn.Module, index: int, kwargs: list[dict[str, Any]], first_hidden: list[Tensor]
                 ) -> None:
        super().__init__()
        self.index, self.kwargs, self.first_hidden = index, kwargs, first_hidden
        if hasattr(layer, "attention_type"):  # some model loops pick a layer's mask by this attribute
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.kwargs[self.index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if self.index == 0:
            self.first_hidden.append(hidden_states)
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(graph: ModelGraph, windows: Tensor, batch_size: int) -> CapturedInputs:
    """Run the embeddings only and keep, batch by batch, what decoder layer 0 receives and every layer's keyword
    arguments (each decoder layer is replaced by a recorder for the duration)."""
    captured = CapturedInputs()
    layers = decoder_layers(graph.model, graph.family)
    originals = list(layers)
    device = graph.model.get_input_embeddings().weight.device
    try:
        for start in range(0, windows.shape[0], batch_size):
            per_layer: list[dict[str, Any]] = [{} for _ in originals]
            for index, layer in enumerate(originals):
                layers[index] = _LayerInputRecorder(layer, index, per_layer, captured.hidden)
            graph.model.base_model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            captured.kwargs.append(per_layer)
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    return captured


@torch.no_grad()
def run_layer(layer: torch.nn.Module, index: int, inputs: CapturedInputs, handles: list[Any] = ()) -> list[Tensor]:
    """Decoder layer ``index``'s outputs on every batch of ``inputs``; ``handles`` (hooks) are removed afterwards."""
    try:
        outputs = []
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
            try:
                out = layer(hidden, **kwargs[index])
            except StopLayer:  # an observer had what it needed; there is no output for this batch
                continue
            outputs.append(out[0] if isinstance(out, tuple) else out)
        return outputs
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def observe_layers(
    graph: ModelGraph, windows: Tensor, observe: Callable[[ModelGraph, int], list[Any]], batch_size: int = 4,
    progress: bool = True, description: str = "statistics", keep_inputs: bool = False,
) -> list[CapturedInputs]:
    """Run the model layer by layer over ``windows`` with ``observe(graph, index)``'s hooks on each layer.

    This is a whole-model forward (same inputs reach every layer) that never runs the LM head. With
    ``keep_inputs`` it returns every layer's inputs (what a :class:`LayerProbe` needs); otherwise an empty list.
    """
    inputs = capture_layer_inputs(graph, windows, batch_size)
    layers = decoder_layers(graph.model, graph.family)
    kept = []
    for index in tqdm(range(len(layers)), desc=description, disable=not progress, leave=False):
        if keep_inputs:
            kept.append(inputs)
        with hold_layer(graph, index) as layer:
            inputs = inputs.with_hidden(run_layer(layer, index, inputs, observe(graph, index)))
    return kept


class LayerProbe:
    """KL of the model's next-token distribution from the unchanged model's, with one layer changed.

    Every layer's inputs on the probe windows are kept from one pass, so a probe of layer ℓ runs only layers ℓ…
    and the LM head (half the cost of a full forward on average), for any architecture family.

    In a data-parallel run every process builds its probe from the same, unsharded probe windows (the first windows
    of the full calibration set, cut identically on every rank) on the same model, so each rank measures the same KL
    and plans the same ranks: nothing of a probe is reduced across processes.
    """

    def __init__(self, graph: ModelGraph, windows: Tensor) -> None:
        self.graph = graph
        self.inputs = observe_layers(graph, windows, lambda g, i: [], batch_size=windows.shape[0], progress=False,
                                     keep_inputs=True)
        self.reference = self._log_probs(0).float()

    @torch.no_grad()
    def _log_probs(self, index: int) -> Tensor:
        layers = decoder_layers(self.graph.model, self.graph.family)
        inputs = self.inputs[index]
        for position in range(index, len(layers)):
            with hold_layer(self.graph, position) as layer:
                inputs = inputs.with_hidden(run_layer(layer, position, inputs))
        logits = lm_logits(self.graph.model, self.graph.family, torch.cat(inputs.hidden))
        return torch.log_softmax(logits.double(), dim=-1)

    def kl_after_change(self, index: int, change: Callable[[], Callable[[], None]]) -> float:
        with hold_layer(self.graph, index):  # an offloaded layer stays in memory, changed, while the rest run
            undo = change()
            try:
                reference = self.reference.double()
                return float((reference.exp() * (reference - self._log_probs(index))).sum(-1).mean())
            finally:
                undo()


def _timed(stage: CalibratingStage, work: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    try:
        return work()
    finally:
        stage.seconds += time.perf_counter() - started


def run_pipeline(
    graph: ModelGraph, windows: Tensor | None, stages: list[CalibratingStage], progress: bool = True,
    after_finish: Callable[[CalibratingStage, ModelGraph], None] | None = None,
    checkpoint: PassCheckpoint | None = None,
) -> ModelGraph:
    """Run ``stages`` through one layer-by-layer pass over ``windows`` (see the module docstring).

    ``after_finish(stage, graph)`` is called after each stage's ``finish``, in recipe order, so the engine can
    record a report row per stage. Only the layer pass runs without gradients: a stage's ``finish`` may train.
    ``checkpoint`` saves (and, when it holds a saved pass, restores) the layer pass.
    """
    for stage in stages:
        graph = _timed(stage, lambda: stage.begin(graph))
    active = [stage for stage in stages if stage.calibrates()]
    if active:
        if windows is None:
            raise ValueError("calibrating stages need calibration windows")
        if checkpoint is None:
            graph = _run_layers(graph, windows, active, progress, None)
        else:
            with checkpoint.deferring_stops():  # a signal stops the pass after the current layer
                graph = _run_layers(graph, windows, active, progress, checkpoint)
    for stage in stages:
        graph = _timed(stage, lambda: stage.finish(graph))
        if after_finish is not None:
            after_finish(stage, graph)
    return graph


def _stream_hidden(stages: list[CalibratingStage], streams: dict[int, CapturedInputs],
                   sequential: CapturedInputs | None) -> dict[str, list[Tensor]]:
    """Each stream's hidden states by a name that survives a restart: ``stage<position>`` or ``sequential``."""
    hidden = {f"stage{position}": streams[id(stage)].hidden for position, stage in enumerate(stages)
              if id(stage) in streams}
    if sequential is not None:
        hidden["sequential"] = sequential.hidden
    return hidden


@torch.no_grad()
def _run_layers(graph: ModelGraph, windows: Tensor, stages: list[CalibratingStage], progress: bool,
                checkpoint: PassCheckpoint | None) -> ModelGraph:
    batch_size = max(stage.batch_size for stage in stages)
    names = "+".join(stage.name for stage in stages)
    planners = [stage for stage in stages if stage.needs_plan()]
    if checkpoint is not None:
        checkpoint.bind(windows, batch_size)
    resumed = checkpoint.restore(graph, stages) if checkpoint is not None else None
    # data-parallel (a3q.distributed): this process observes its share of the windows, in whole batches (the very
    # batches one process would run), and every statistic is summed over the processes before a layer is changed
    # (or planned from); probes use every window, unsharded
    reduce = distributed.all_reduce_sum if distributed.world_size() > 1 else None
    every_window, windows = windows, distributed.shard(windows, batch_size)
    for planner in planners if resumed is None else []:  # every layer's statistics before any layer changes
        _timed(planner, lambda: observe_layers(graph, windows, planner.observe, batch_size, progress,
                                               f"{planner.name} statistics"))
        if reduce is not None:
            _timed(planner, lambda: [planner.reduce_statistics(i, reduce) for i in range(len(graph.layers))])
        probe_windows = planner.probe_windows(every_window)
        probe = LayerProbe(graph, probe_windows) if probe_windows is not None else None
        _timed(planner, lambda: planner.plan(graph, probe))
    entry = capture_layer_inputs(graph, windows, batch_size)
    streams = {id(s): entry for s in stages if s.statistics == "dense" and s not in planners}
    sequential = entry if any(s.statistics == "sequential" for s in stages) else None
    start = 0
    if resumed is not None:  # the saved inputs of the next layer, with the keyword arguments captured again
        start = resumed.next_layer
        streams = {id(s): entry.with_hidden(resumed.hidden[f"stage{position}"]) for position, s in enumerate(stages)
                   if id(s) in streams}
        sequential = entry.with_hidden(resumed.hidden["sequential"]) if sequential is not None else None
    elif planners and checkpoint is not None:
        checkpoint.after_plan(graph, stages, _stream_hidden(stages, streams, sequential))
    layers = tqdm(range(start, len(graph.layers)), desc=f"{names} (layer by layer)", disable=not progress,
                  leave=False, initial=start, total=len(graph.layers))
    for index in layers:
        with hold_layer(graph, index):  # an offloaded layer is read in here and written out, changed, after
            sequential = _finish_layer(graph, index, stages, planners, streams, sequential, reduce, names)
            graph.layer_store.mark_changed(graph, index)
            if checkpoint is not None:
                checkpoint.after_layer(graph, index, stages, _stream_hidden(stages, streams, sequential))
    return graph


def _finish_layer(graph: ModelGraph, index: int, stages: list[CalibratingStage], planners: list[CalibratingStage],
                  streams: dict[int, CapturedInputs], sequential: CapturedInputs | None, reduce: Any, names: str
                  ) -> CapturedInputs | None:
    """Every stage observes (through its own stream or the sequential one) and changes layer ``index``; the
    streams advance (``streams`` in place); returns the sequential stream's next inputs."""
    prefix = LAYER_PREFIX[graph.family]
    for stage in stages:
        def work() -> None:
            nonlocal sequential
            layer = decoder_layers(graph.model, graph.family)[index]
            inputs = streams.get(id(stage), sequential)
            if id(stage) in streams:  # the stage's own stream advances through the layer as it found it
                streams[id(stage)] = inputs.with_hidden(run_layer(layer, index, inputs, stage.observe(graph, index)))
            elif stage not in planners:
                handles = stage.observe(graph, index)
                if handles:
                    run_layer(layer, index, inputs, handles)
            if reduce is not None and stage not in planners:
                stage.reduce_statistics(index, reduce)
            while stage.process(graph, index):  # another look at the layer, as changed so far
                layer = decoder_layers(graph.model, graph.family)[index]
                run_layer(layer, index, inputs, stage.observe(graph, index))
                if reduce is not None:
                    stage.reduce_statistics(index, reduce)
        _timed(stage, work)
        layer = decoder_layers(graph.model, graph.family)[index]
        check_module_finite(layer, f"{stage.name}, layer {index}", prefix=prefix.format(index=index))
    if reduce is not None:  # every process must now hold the same layer (a3q.distributed.check_identical)
        distributed.check_identical(decoder_layers(graph.model, graph.family)[index], f"{names}, layer {index}")
    if sequential is not None:
        layer = decoder_layers(graph.model, graph.family)[index]
        sequential = sequential.with_hidden(run_layer(layer, index, sequential))
        check_activations_finite(sequential.hidden, f"{names}: output of layer {index}")
    return sequential
