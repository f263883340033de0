"""Stages as a run groups and calls them: their context, pipeline passes, report rows, and use outside a recipe.

:func:`plan_groups` decides which consecutive stages share one pipeline pass; :func:`apply_stages` runs stages on a
graph without a recipe file, grouped the way a run groups them (tests, notebooks, benchmarks). The engine
(:mod:`a3q.engine`) adds loading, checks, checkpoints and the report around the same pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from a3q.graph import ModelGraph
from a3q.pipeline.runner import run_pipeline
from a3q.pipeline.stage import CalibratingStage
from a3q.recipe import Recipe, StageSpec
from a3q.registry import get_stage
from a3q.report import Report


@dataclass
class StageContext:
    """What a running stage may use besides the graph and its config, and where it puts its report fields.

    Stages never fetch calibration data: the engine's pipeline runs the model over it for them. Build one directly
    in tests: ``StageContext(recipe, spec)``; the engine passes its report and output folder.
    """

    recipe: Recipe
    spec: StageSpec
    output_dir: Path = Path(".")
    report: Report = field(default_factory=Report)
    metrics: dict[str, Any] = field(default_factory=dict)


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


def graph_row(stage: str, graph: ModelGraph) -> dict[str, Any]:
    """The size columns every report row has."""
    return {
        "stage": stage,
        "params": graph.decoder_linear_params(),
        "weight_bytes": graph.decoder_linear_bytes(),
        "kv_bytes_per_token": graph.kv_bytes_per_token(),
    }


def repeat_quality_measurement(graph: ModelGraph, context: StageContext) -> None:
    """After a training stage: run the last quality-measuring stage again and report before → after."""
    earlier = context.recipe.stages[: context.spec.index]
    spec = next((s for s in reversed(earlier) if type(s.config).measures_quality), None)
    row = next((r for r in reversed(context.report.rows) if spec is not None and r.get("stage") == spec.name
                and "ppl" in r), None)
    if spec is None or row is None:
        return
    scratch = StageContext(context.recipe, spec.model_copy(update={"index": context.spec.index}), context.output_dir,
                           context.report)
    get_stage(spec.name).build(spec.config, scratch).finish(graph)
    after = scratch.metrics
    context.metrics.update(ppl_before=row["ppl"], ppl=after["ppl"], eval=after.get("eval"))
    note = context.metrics.get("note", "")
    context.metrics["note"] = f"{note}, ppl {row['ppl']:.2f}→{after['ppl']:.2f}".lstrip(", ")


def apply_stages(
    graph: ModelGraph, stages: list[tuple[str, Any]], windows: torch.Tensor | None = None
) -> tuple[ModelGraph, list[dict[str, Any]]]:
    """Run stages on ``graph`` outside a recipe (tests, notebooks, benchmarks), grouped into pipeline passes as a run
    groups them: the graph after them and each stage's report fields.

    ``stages`` are ``(name, config)`` pairs, the config a stage config object or a dict of its fields; ``windows``
    are the calibration windows. As in a run, stages change ``graph``'s model in place: pass a copy to keep it.
    """
    from a3q.recipe import CalibrationConfig

    specs = []
    for index, (name, config) in enumerate(stages):
        entry = get_stage(name)
        config = entry.config_class(**config) if isinstance(config, dict) else config
        specs.append(StageSpec(index=index, name=name, config=config))
    recipe = Recipe(model=graph.source, dtype="float32", calibration=CalibrationConfig(), stages=specs, output=None,
                    raw={})
    contexts = [StageContext(recipe, spec) for spec in specs]
    workers = [get_stage(spec.name).build(spec.config, context) for spec, context in zip(specs, contexts)]
    for group in plan_groups(workers):
        calibrating = any(worker.calibrates() for worker in group)
        graph = run_pipeline(graph, windows if calibrating else None, group, progress=False)
    for worker, context in zip(workers, contexts):
        context.metrics.update(worker.metrics)
    return graph, [context.metrics for context in contexts]


def apply_stage(
    graph: ModelGraph, name: str, config: Any = None, windows: torch.Tensor | None = None, **fields: Any
) -> tuple[ModelGraph, dict[str, Any]]:
    """One stage, as :func:`apply_stages`: ``config`` or ``fields`` give its settings. Returns the graph and the
    stage's report fields."""
    graph, (metrics,) = apply_stages(graph, [(name, config if config is not None else fields)], windows)
    return graph, metrics
