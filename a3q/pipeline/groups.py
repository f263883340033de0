"""Which consecutive stages share one pipeline pass (:func:`plan_groups`): the engine runs a group per pass, and a
resumed checkpoint is checked against the same grouping."""

from __future__ import annotations

from a3q.pipeline.stage import CalibratingStage


def plan_groups(stages: list[CalibratingStage]) -> list[list[CalibratingStage]]:
    """Consecutive calibrating stages share one pipeline pass; every other stage runs on its own.

    A stage that plans from every layer's statistics (A³'s global allocation) starts a pass of its own: it must see
    the model as the pass receives it, before any other stage of the pass changes a layer. So does a stage that
    resizes layers after another one that does (A³ then KV ranks): its ranks are planned, in ``begin``, from the sizes
    the earlier stage leaves, which exist only once that stage finished.
    """
    groups: list[list[CalibratingStage]] = []
    for stage in stages:
        previous = groups[-1] if groups else None
        second_resizer = stage.resizes_layers and previous and any(other.resizes_layers for other in previous)
        if (stage.calibrates() and previous and previous[-1].calibrates() and not stage.needs_plan()
                and not second_resizer):
            previous.append(stage)
        else:
            groups.append([stage])
    return groups


def calibration_batch(stages: list[CalibratingStage]) -> int:
    """The largest batch any calibrating stage runs: it makes the fewest batches, so it decides whether every process
    of a data-parallel run gets one (:class:`a3q.distributed.WindowShares`)."""
    return max((stage.batch_size for stage in stages if stage.calibrates()), default=1)
