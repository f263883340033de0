"""The engine: load the model, run each stage in order, record a report row per stage.

Stages never load data themselves for calibration: they ask the :class:`StageContext`, which
cuts the recipe's calibration windows once and hands the same tensor to every stage that asks.
``report.json`` is rewritten (atomically) after every stage, so a failed run still shows how far
it got and what each finished stage measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from a3q import __version__
from a3q.assets.cache import write_json_atomic
from a3q.calib.windows import random_windows
from a3q.graph import ModelGraph
from a3q.io.loading import load_graph
from a3q.recipe import Recipe, StageSpec
from a3q.calib.layerwise import run_layerwise
from a3q.registry import get_stage, layerwise_part
from a3q.report import Report, measure, print_table


class StageError(RuntimeError):
    """A stage failed while running; the message names the stage."""


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


def run_recipe(
    recipe: Recipe, output_dir: str | Path | None = None, console: Console | None = None, show_table: bool = True
) -> RunResult:
    """Run every stage of ``recipe``; write ``report.json`` into the output folder."""
    console = console or Console(stderr=True)
    out = Path(output_dir or recipe.output or "out/run")
    out.mkdir(parents=True, exist_ok=True)
    report = Report(context={"a3q_version": __version__, "model": recipe.model, "recipe": recipe.raw})
    with measure() as loading:
        console.log(f"loading model '{recipe.model}' ({recipe.dtype})")
        graph = load_graph(recipe.model, recipe.dtype)
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
            except Exception as exc:
                write_json_atomic(out / "report.json", {**report.to_json(), "failed": f"{labels}: {exc}"})
                raise StageError(f"{labels} failed: {exc}") from exc
        if len(group) == 1:
            record(group[0], contexts[0], measured.seconds, measured.peak_rss_mb)
        else:
            for spec, context in zip(group, contexts):
                record(spec, context, context.metrics.pop("seconds"), measured.peak_rss_mb)
    if show_table:
        print_table(report.rows, title=f"a3q: {recipe.model}", console=Console())
    return RunResult(graph=graph, report=report, output_dir=out)
