"""The engine: load the model, run each stage in order, record a report row per stage.

Stages never run the model over calibration data themselves: consecutive calibrating stages form one group that
the pipeline (:mod:`a3q.pipeline.runner`) runs layer by layer over the recipe's calibration windows, cut once per
run; other stages are called as they are. After a training stage the engine repeats the recipe's last quality
measurement, so the report shows before → after.
``report.json`` is written (atomically) when the run starts (``status: running``) and after every stage, and ends
``complete`` or ``failed`` (with the reason), so a failed or killed run still shows how far it got.

Before the model loads, the engine checks what validation could not: that no export would replace the run's own
output folder, and that the corpus holds the windows the stages ask for (this needs the tokenizer, not the model).
The model is checked for non-finite values after loading and after every stage (:mod:`a3q.numerics`).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from a3q import __version__
from a3q.assets.cache import write_json_atomic
from a3q.calib.windows import random_windows, window_shortfalls
from a3q.graph import ModelGraph
from a3q.io.loading import load_graph
from a3q.numerics import check_module_finite
from a3q.recipe import Recipe, RecipeError, StageSpec
from a3q.pipeline.runner import run_pipeline
from a3q.pipeline.stage import CalibratingStage
from a3q.registry import get_stage
from a3q.report import Report, measure, print_table


class StageError(RuntimeError):
    """A stage (or loading the model) failed while running; the message names it."""


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


class CalibrationWindows:
    """The recipe's calibration windows, cut once per run (with the model's tokenizer) and shared by every pass."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self._windows: torch.Tensor | None = None

    def get(self, graph: ModelGraph) -> torch.Tensor:
        if self._windows is None:
            cal = self.recipe.calibration
            self._windows = random_windows(graph.tokenizer, cal.corpus, cal.split, cal.seq_len, cal.windows, cal.seed)
        return self._windows


def plan_groups(stages: list[CalibratingStage]) -> list[list[CalibratingStage]]:
    """Consecutive calibrating stages share one pipeline pass; every other stage runs on its own.

    A stage that plans from every layer's statistics (A³'s global allocation) starts a pass of its own: it must see
    the model as the pass receives it, before any other stage of the pass changes a layer.
    """
    groups: list[list[CalibratingStage]] = []
    for stage in stages:
        previous = groups[-1] if groups else None
        if stage.calibrates() and previous and previous[-1].calibrates() and not stage.needs_plan():
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


def _repeat_quality_measurement(graph: ModelGraph, context: StageContext) -> None:
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


@dataclass
class RunResult:
    """The model after the last stage, and the report of the run."""

    graph: ModelGraph
    report: Report
    output_dir: Path


def check_run(recipe: Recipe, out: Path) -> list[str]:
    """Problems that depend on where the run writes (known only at run time): an export that would replace the
    folder holding this run's report, or a folder above it."""
    problems = []
    for spec in recipe.stages:
        target = spec.config.artifact_target()
        if target is None:
            continue
        resolved = Path(target).resolve()
        if resolved == out or resolved in out.parents:
            problems.append(f"{spec.label}: path: '{target}' is (or contains) the run's output folder '{out}', "
                            "where report.json goes; export somewhere else")
    return problems


def check_text(recipe: Recipe) -> list[str]:
    """Whether the corpus splits hold the windows the recipe asks for (loads the tokenizer only)."""
    from transformers import AutoTokenizer

    from a3q.assets.models import resolve_model_path

    demands = [demand for spec in recipe.stages for demand in spec.config.text_demands(spec.label)]
    if any(spec.config.needs_calibration for spec in recipe.stages):
        cal = recipe.calibration
        demands.append(("calibration.windows", cal.corpus, cal.split, cal.windows, cal.seq_len))
    if not demands:
        return []
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(recipe.model)))
    return window_shortfalls(tokenizer, demands)


def run_recipe(
    recipe: Recipe, output_dir: str | Path | None = None, console: Console | None = None, show_table: bool = True
) -> RunResult:
    """Run every stage of ``recipe``; write ``report.json`` into the output folder.

    Raises :class:`~a3q.recipe.RecipeError` for problems found before the model loads and :class:`StageError` for
    a failure while loading or running a stage; either way ``report.json`` ends ``status: failed`` with the reason.
    """
    console = console or Console(stderr=True)
    out = Path(output_dir or recipe.output or "out/run").resolve()
    problems = check_run(recipe, out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(context={"a3q_version": __version__, "status": "running", "model": recipe.model, "recipe": recipe.raw})
    write_json_atomic(out / "report.json", report.to_json())

    def fail(message: str, exc: BaseException | None = None) -> None:
        payload = {**report.to_json(), "status": "failed", "failed": message}
        if exc is not None and not isinstance(exc, RecipeError):
            payload["traceback"] = traceback.format_exception(exc)
        write_json_atomic(out / "report.json", payload)

    try:
        problems = problems or check_text(recipe)
        if problems:
            raise RecipeError(problems)
        with measure() as loading:
            console.log(f"loading model '{recipe.model}' ({recipe.dtype})")
            graph = load_graph(recipe.model, recipe.dtype)
            check_module_finite(graph.model, f"load '{recipe.model}'")
    except RecipeError as exc:
        fail(str(exc), exc)
        raise
    except BaseException as exc:
        fail(f"load: {exc}" if isinstance(exc, Exception) else f"load: interrupted ({type(exc).__name__})", exc)
        if isinstance(exc, Exception):
            raise StageError(f"loading '{recipe.model}' failed: {exc}") from exc
        raise
    report.rows.append({**graph_row("load", graph), "seconds": loading.seconds, "peak_rss_mb": loading.peak_rss_mb})
    calibration = CalibrationWindows(recipe)
    contexts = {spec.index: StageContext(recipe, spec, out, report) for spec in recipe.stages}
    workers = [get_stage(spec.name).build(spec.config, contexts[spec.index]) for spec in recipe.stages]
    spec_of = {id(worker): spec for worker, spec in zip(workers, recipe.stages)}

    for group in plan_groups(workers):
        specs = [spec_of[id(worker)] for worker in group]
        labels = " + ".join(spec.label for spec in specs)
        calibrating = [worker for worker in group if worker.calibrates()]
        console.log(f"{labels}: running" + (" (one layer-by-layer calibration pass)" if calibrating else ""))
        finished: dict[int, ModelGraph] = {}

        def after_finish(worker: CalibratingStage, finished_graph: ModelGraph) -> None:
            spec = spec_of[id(worker)]
            context = contexts[spec.index]
            context.metrics.update(graph_row(spec.name, finished_graph))  # sizes as this stage left them
            context.metrics.update(worker.metrics)
            if len(group) > 1:
                context.metrics["shared_pass_with"] = [s.label for s in specs if s is not spec]
            if type(spec.config).trains:
                _repeat_quality_measurement(finished_graph, context)
            finished[spec.index] = finished_graph

        with measure() as measured:
            try:
                windows = calibration.get(graph) if calibrating else None
                graph = run_pipeline(graph, windows, group, after_finish=after_finish)
                check_module_finite(graph.model, f"{labels}: output")
            except Exception as exc:
                fail(f"{labels}: {exc}", exc)
                raise StageError(f"{labels} failed: {exc}") from exc
            except BaseException as exc:  # Ctrl-C, SystemExit: the report says so before the process goes
                fail(f"{labels}: interrupted ({type(exc).__name__})", exc)
                raise
        for worker, spec in zip(group, specs):
            graph.history.append({"stage": spec.name, "config": spec.config.model_dump(mode="json")})
            seconds = worker.seconds if len(group) > 1 else measured.seconds
            report.rows.append({**graph_row(spec.name, finished[spec.index]), "seconds": seconds,
                                "peak_rss_mb": measured.peak_rss_mb, **contexts[spec.index].metrics})
        if len(group) > 1:
            report.rows[-1]["shared_pass_seconds"] = measured.seconds
        write_json_atomic(out / "report.json", report.to_json())
    report.context["status"] = "complete"
    write_json_atomic(out / "report.json", report.to_json())
    if show_table:
        print_table(report.rows, title=f"a3q: {recipe.model}", console=Console())
    return RunResult(graph=graph, report=report, output_dir=out)
