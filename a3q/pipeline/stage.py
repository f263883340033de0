"""What a calibrating stage writes: observe a layer, (optionally) plan, process a layer. Nothing else.

A stage never runs the model, never moves tensors between devices and never writes files: the pipeline
(:mod:`a3q.pipeline.runner`) does, for every stage at once. A stage says

* which **statistics** it wants: ``dense`` (each layer observed on inputs from the layers before it as the stage
  found them: the paper's protocol, equivalent to one whole-model forward of the model entering the stage) or
  ``sequential`` (inputs from the layers before it as already changed by this and every stage in the pass, which is
  what GPTQ needs: each layer is fitted to what it will see at inference);
* :meth:`CalibratingStage.observe`: hooks on one layer that accumulate what :meth:`~CalibratingStage.process`
  needs (plain sums with token counts, so they could be reduced across processes);
* :meth:`CalibratingStage.reduce_statistics`: in a data-parallel run (:mod:`a3q.distributed`), sums what
  ``observe`` accumulated over every rank, before ``process`` (or ``plan``) reads it;
* :meth:`CalibratingStage.plan` (optional, ``needs_plan``): sees every layer's statistics before any layer is
  changed, with a :class:`Probe` to measure the loss of trial changes (A³'s global rank allocation);
* :meth:`CalibratingStage.process`: change one layer in place (and, if it returns True, observe it again);
* :meth:`CalibratingStage.state_dict`: what later layers and ``finish`` need from earlier ones, for checkpoints
  (:mod:`a3q.checkpoint`): JSON values and tensors; :attr:`CalibratingStage.checkpointed` names plain attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from torch import Tensor

    from a3q.graph import ModelGraph

Statistics = Literal["dense", "sequential"]


class StopLayer(Exception):
    """Raised by an observing hook that has what it needs: the pipeline stops running the layer on that batch."""


class Probe(Protocol):
    """Measures trial changes on a few fixed windows (built by the pipeline for planning stages)."""

    def kl_after_change(self, index: int, change: Callable[[], Callable[[], None]]) -> float:
        """KL of the model's next-token distribution from the unchanged model's, with layer ``index`` changed.

        ``change()`` applies the change and returns a function that undoes it.
        """


class CalibratingStage:
    """One stage's part in the engine's calibration pipeline; subclasses override what they need."""

    #: the stage's name, for progress bars and errors
    name: str = "stage"
    #: where each layer's statistics come from (see the module docstring)
    statistics: Statistics = "sequential"
    #: windows per forward; the pass uses the largest of its stages'
    batch_size: int = 4
    #: whether :meth:`process` changes layer sizes (one such stage per pass: see :func:`a3q.pipeline.groups.plan_groups`)
    resizes_layers: bool = False
    #: attributes carried from layer to layer (JSON values and tensors), saved in checkpoints by :meth:`state_dict`
    checkpointed: tuple[str, ...] = ("seconds", "metrics")

    def __init__(self) -> None:
        self.seconds = 0.0  # this stage's share of the pass: its observation forwards and processing
        self.metrics: dict[str, Any] = {}

    def calibrates(self) -> bool:
        """Whether this stage observes layers at all (a KV stage that only sets cache bits does not)."""
        return True

    def needs_plan(self) -> bool:
        """Whether :meth:`plan` must see every layer's statistics before any layer is processed."""
        return False

    def probe_windows(self, windows: Tensor) -> Tensor | None:
        """The windows a :class:`Probe` for :meth:`plan` should use (None: no probe)."""
        return None

    def begin(self, graph: ModelGraph) -> ModelGraph:
        """Before the pass (e.g. convert the model class); returns the graph the pass runs on."""
        return graph

    def observe(self, graph: ModelGraph, index: int) -> list[Any]:
        """Register hooks on layer ``index`` that record what :meth:`process` needs; returns the handles."""
        return []

    def reduce_statistics(self, index: int, reduce: Callable[[Tensor], Tensor]) -> None:
        """Replace what :meth:`observe` accumulated for layer ``index`` by its sum over every process.

        Called by the pipeline in a multi-process run only, after each observation of the layer and before
        :meth:`process` (for planners: after every layer's observation, before :meth:`plan`). ``reduce(t)`` returns
        the element-wise sum of ``t`` over the ranks; reduce **sums and token counts, never averages** (normalise
        afterwards, as ``process`` does anyway), and prefer one call per layer (e.g.
        :func:`a3q.distributed.reduce_together`). Every rank must make the same calls in the same order, whatever
        its data. Default: nothing to reduce.
        """

    def plan(self, graph: ModelGraph, probe: Probe | None) -> None:
        """After every layer was observed, before any is processed (only when :meth:`needs_plan`)."""

    def process(self, graph: ModelGraph, index: int) -> bool | None:
        """Change layer ``index`` in place, from what the hooks recorded.

        Return True to observe the (partly changed) layer again and be called once more, e.g. GPTQ's true-sequential
        order, where each group's Hessian is measured after the groups before it were quantized.
        """

    def finish(self, graph: ModelGraph) -> ModelGraph:
        """After the pass: update the graph's description; fill :attr:`metrics`."""
        return graph

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed pass needs from the layers before (between layers; JSON values and tensors)."""
        return {name: getattr(self, name) for name in self.checkpointed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (after :meth:`begin`); only the attributes it names."""
        unknown = set(state) - set(self.checkpointed)
        if unknown:
            raise ValueError(f"{self.name}: checkpoint state names unknown attributes {sorted(unknown)}")
        for name, value in state.items():
            setattr(self, name, value)
