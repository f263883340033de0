"""The engine: load the model, run each stage in order, record a report row per stage.

Stages never load data themselves for calibration: they ask the :class:`StageContext`, which
cuts the recipe's calibration windows once and hands the same tensor to every stage that asks.
``report.json`` is rewritten (atomically) after every stage, so a failed run still shows how far
it got and what each finished stage measured.
"""

from __future__ import annotations

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
from a3q.registry import get_stage
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


def graph_row(stage: str, graph: ModelGraph) -> dict[str, Any]:
    """The size columns every report row has."""
    return {
        "stage": stage,
        "params": graph.decoder_linear_params(),
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
    for spec in recipe.stages:
        entry = get_stage(spec.name)
        context = StageContext(recipe, spec, out, report, _calibration=shared_calibration)
        console.log(f"{spec.label}: running")
        with measure() as measured:
            try:
                graph = entry.apply(graph, spec.config, context)
            except Exception as exc:
                write_json_atomic(out / "report.json", {**report.to_json(), "failed": f"{spec.label}: {exc}"})
                raise StageError(f"{spec.label} failed: {exc}") from exc
        graph.history.append({"stage": spec.name, "config": spec.config.model_dump(mode="json")})
        row = {**graph_row(spec.name, graph), "seconds": measured.seconds, "peak_rss_mb": measured.peak_rss_mb}
        row.update(context.metrics)
        report.rows.append(row)
        write_json_atomic(out / "report.json", report.to_json())
    if show_table:
        print_table(report.rows, title=f"a3q: {recipe.model}", console=Console())
    return RunResult(graph=graph, report=report, output_dir=out)
