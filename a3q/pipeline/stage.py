"""What a calibrating stage writes: observe a layer, (optionally) plan, process a layer. Nothing else.

A stage never runs the model, never moves tensors between devices and never writes files: the pipeline
(:mod:`a3q.pipeline.runner`) does, for every stage at once. A stage says

* which **statistics** it wants: ``dense`` (each layer observed on inputs from the layers before it as the stage
  found them: the paper's protocol, equivalent to one whole-model forward of the model entering the stage) or
  ``sequential`` (inputs from the layers before it as already changed by this and every stage in the pass, which is
  what GPTQ needs: each layer is fitted to what it will see at inference);
* :meth:`CalibratingStage.observe`: hooks on one layer that accumulate what :meth:`~CalibratingStage.process`
  needs (plain sums with token counts, so they could be reduced across processes);
* :meth:`CalibratingStage.plan` (optional, ``needs_plan``): sees every layer's statistics before any layer is
  changed, with a :class:`Probe` to measure the loss of trial changes (A³'s global rank allocation);
* :meth:`CalibratingStage.process`: change one layer in place (and, if it returns True, observe it again).
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
