"""The engine: load the model, run each stage in order, record a report row per stage.

Stages never load data themselves for calibration: they ask the :class:`StageContext`, which
cuts the recipe's calibration windows once and hands the same tensor to every stage that asks.
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
from a3q.calib.layerwise import run_layerwise
from a3q.registry import get_stage, layerwise_part
from a3q.report import Report, measure, print_table


class StageError(RuntimeError):
    """A stage (or loading the model) failed while running; the message names it."""


@dataclass
class StageContext:
    """What a running stage may ask the engine for, and where it puts its results."""

    recipe: Recipe
    spec: StageSpec
    output_dir: Path
    report: Report
    metrics: dict[str, Any] = field(default_factory=dict)
    _calibration: dict[str, torch.Tensor] = field(default_factory=dict)

    def calibration_windows(self, graph: ModelGraph) -> torch.Tensor:
        """The recipe's calibration windows ``[windows, seq_len]``, cut once per run."""
        if "windows" not in self._calibration:
            cal = self.recipe.calibration
            self._calibration["windows"] = random_windows(
                graph.tokenizer, cal.corpus, cal.split, cal.seq_len, cal.windows, cal.seed
            )
        return self._calibration["windows"]


def plan_passes(stages: list[StageSpec]) -> list[list[StageSpec]]:
    """Group the recipe into runs: consecutive stages that can share a layer-by-layer pass form one group.

    A stage can when it registered a layer-wise part (:func:`a3q.registry.register_layerwise`) that accepts its
    config; every other stage is a group of its own.
    """
    groups: list[list[StageSpec]] = []
    for spec in stages:
        shareable = layerwise_part(spec.name, spec.config) is not None
        previous = groups[-1] if groups else None
        if shareable and previous and layerwise_part(previous[-1].name, previous[-1].config) is not None:
            previous.append(spec)
        else:
            groups.append([spec])
    return groups


def _run_shared_pass(graph: ModelGraph, group: list[StageSpec], contexts: list[StageContext]) -> ModelGraph:
    """Run a group of layer-wise stages in one pass; each context gets its stage's metrics and seconds."""
    parts = [layerwise_part(spec.name, spec.config) for spec in group]
    windows = contexts[0].calibration_windows(graph)
    batch_size = max(getattr(spec.config, "batch_size", 4) for spec in group)
    started = time.perf_counter()
    context_of = {id(part): context for part, context in zip(parts, contexts)}
    others = {id(part): [spec.label for spec in group if spec is not own] for part, own in zip(parts, group)}

    def after_finish(part, finished_graph) -> None:
        context = context_of[id(part)]
        context.metrics.update(graph_row(context.spec.name, finished_graph))  # sizes as this stage left them
        context.metrics.update(part.metrics)
        context.metrics.update(seconds=part.seconds, shared_pass_with=others[id(part)])

    graph = run_layerwise(graph, windows, parts, batch_size, after_finish=after_finish)
    contexts[-1].metrics["shared_pass_seconds"] = time.perf_counter() - started
    return graph


def graph_row(stage: str, graph: ModelGraph) -> dict[str, Any]:
    """The size columns every report row has."""
    return {
        "stage": stage,
        "params": graph.decoder_linear_params(),
        "weight_bytes": graph.decoder_linear_bytes(),
        "kv_bytes_per_token": graph.kv_bytes_per_token(),
    }


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
    shared_calibration: dict[str, torch.Tensor] = {}

    def record(spec: StageSpec, context: StageContext, seconds: float, peak_rss_mb: float) -> None:
        graph.history.append({"stage": spec.name, "config": spec.config.model_dump(mode="json")})
        report.rows.append({**graph_row(spec.name, graph), "seconds": seconds, "peak_rss_mb": peak_rss_mb, **context.metrics})
        write_json_atomic(out / "report.json", report.to_json())

    for group in plan_passes(recipe.stages):
        contexts = [StageContext(recipe, spec, out, report, _calibration=shared_calibration) for spec in group]
        labels = " + ".join(spec.label for spec in group)
        console.log(f"{labels}: running" + (" (one shared layer-by-layer calibration pass)" if len(group) > 1 else ""))
        with measure() as measured:
            try:
                if len(group) == 1:
                    graph = get_stage(group[0].name).apply(graph, group[0].config, contexts[0])
                else:
                    graph = _run_shared_pass(graph, group, contexts)
                check_module_finite(graph.model, f"{labels}: output")
            except Exception as exc:
                fail(f"{labels}: {exc}", exc)
                raise StageError(f"{labels} failed: {exc}") from exc
            except BaseException as exc:  # Ctrl-C, SystemExit: the report says so before the process goes
                fail(f"{labels}: interrupted ({type(exc).__name__})", exc)
                raise
        if len(group) == 1:
            record(group[0], contexts[0], measured.seconds, measured.peak_rss_mb)
        else:
            for spec, context in zip(group, contexts):
                record(spec, context, context.metrics.pop("seconds"), measured.peak_rss_mb)
    report.context["status"] = "complete"
    write_json_atomic(out / "report.json", report.to_json())
    if show_table:
        print_table(report.rows, title=f"a3q: {recipe.model}", console=Console())
    return RunResult(graph=graph, report=report, output_dir=out)
