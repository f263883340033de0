"""The run plan: where and how a run goes, decided before anything loads; and the model sizes stages estimate from.

:func:`a3q.preflight.preflight` returns a :class:`RunPlan` (it reads config.json and safetensors headers, never
tensor data); the engine loads the model by it and records it in the report. Each stage's config declares what it
needs on top of the model (:meth:`~a3q.registry.StageConfig.memory_estimate`, from a :class:`ModelShape`), so the
preflight has no rule for any stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunPlan:
    """The preflight's answer, passed on by the engine (to loading and to the report); a run with ``problems`` is
    refused before anything loads."""

    #: this process's device, resolved (``cpu``, ``cuda:0``; ``cuda:LOCAL_RANK`` for a rank of a GPU run)
    device: str
    #: the run's dtype, resolved (``float32``…); the recipe's own when no estimate could be made (loading resolves it)
    dtype: str
    #: ``none``, ``cpu`` or ``disk`` (``offload: auto`` decided: offloaded only when the whole model does not fit)
    offload: str
    #: copies of the run on this machine that the memory check counted (a data-parallel run's local processes)
    processes: int
    #: bytes by component (:func:`a3q.preflight.estimate_memory`), or ``{"error": …}`` when none could be made
    estimate: dict[str, Any]
    #: why the run cannot go this way (memory, GPUs per process), each naming what would fit; empty: it fits
    problems: list[str] = field(default_factory=list)

    def report_fields(self) -> dict[str, Any]:
        """The report context's entries for the plan (a refused run's report has them too: the estimate says why)."""
        return {"device": self.device, "dtype": self.dtype, "offload": self.offload, "memory_estimate": self.estimate}


@dataclass(frozen=True)
class ModelShape:
    """The model's sizes (from config.json) and the run's float width: what a stage's memory estimate reads."""

    hidden: int
    intermediate: int
    heads: int
    layers: int
    vocab: int
    #: bytes per element of the run's float dtype
    width: int

    def forward_bytes(self, batch: int, seq_len: int, logits: bool = False) -> int:
        """One layer's activations and attention scores for ``batch`` windows of ``seq_len`` tokens; with
        ``logits``, the float32 logits of the batch and one window's float64 log-softmax as well."""
        tokens = batch * seq_len
        layer = tokens * (4 * self.hidden + 3 * self.intermediate) * self.width
        scores = batch * self.heads * seq_len * seq_len * self.width
        return layer + scores + (tokens * self.vocab * 4 + seq_len * self.vocab * 8 if logits else 0)
