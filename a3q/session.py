"""One run of a recipe after its checks: load, run the stage groups, checkpoint, report (:class:`RunSession`).

The session holds what every step of a run shares: the recipe, the output folder, the report, the run's checkpoint
and the console. Each step (loading, a stage group, the checkpoint after it, the end) runs inside
:meth:`RunSession.step`, so every failure and every stop is handled once, the same way: ``report.json`` ends
``failed`` or ``stopped`` with the reason (and the last checkpoint), then the error goes up named by the step.
``report.json`` is written when the session starts (``status: running``) and after every stage group.

Stages never run the model over calibration data themselves: each group of consecutive calibrating stages is one
pass of the pipeline (:mod:`a3q.pipeline.runner`) over the recipe's calibration windows, cut once per run; other
stages are called as they are. After a training stage the session repeats the recipe's last quality measurement,
so the report shows before → after.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from a3q import __version__, distributed
from a3q.assets.models import resolve_model_path
from a3q.atomic import write_json_atomic
from a3q.checkpoint.run import CheckpointRefused, RunCheckpoint
from a3q.checkpoint.stops import RunStopped, StopSignals
from a3q.checkpoint.store import CheckpointError
from a3q.graph import ModelGraph
from a3q.io.loading import load_graph
from a3q.numerics import check_module_finite
from a3q.pipeline.context import StageContext
from a3q.pipeline.groups import plan_groups
from a3q.pipeline.plan import RunPlan
from a3q.pipeline.runner import run_pipeline
from a3q.pipeline.stage import CalibratingStage
from a3q.pipeline.windows import CalibrationWindows
from a3q.recipe import Recipe, RecipeError, StageSpec
from a3q.registry import build_stages, get_stage
from a3q.report import Report, measure, print_table


class StageError(RuntimeError):
    """A stage (or loading the model) failed while running; the message names it."""


@dataclass
class RunResult:
    """The model after the last stage, and the report of the run."""

    graph: ModelGraph
    report: Report
    output_dir: Path


def size_columns(stage: str, graph: ModelGraph) -> dict[str, Any]:
    """The size columns every report row has."""
    return {"stage": stage, "params": graph.decoder_linear_params(), "weight_bytes": graph.decoder_linear_bytes(),
            "kv_bytes_per_token": graph.kv_bytes_per_token()}


class RunSession:
    """One run of ``recipe`` into ``out``; see the module docstring. In a data-parallel run every rank has one, and
    rank 0 alone writes ``report.json``."""

    def __init__(self, recipe: Recipe, out: Path, console: Console | None = None) -> None:
        self.recipe, self.out = recipe, out
        self.console = console or Console(stderr=True, quiet=not distributed.is_main())
        self.report = Report(context={"a3q_version": __version__, "status": "running", "model": recipe.model,
                                      "recipe": recipe.raw, "world_size": distributed.world_size()})
        self.checkpoint: RunCheckpoint | None = None
        self._write(self.report.to_json())

    # -- the steps ---------------------------------------------------------------------------------------------------
    def load(self, plan: RunPlan, stops: StopSignals, resume: bool, restart: bool) -> ModelGraph:
        """Open the run's checkpoint (``resume``: continue it; ``restart``: discard it) and load, by ``plan``, the
        model the run starts from: the recipe's, or the checkpoint's after its last completed group. A plan with
        problems refuses the run here (:class:`~a3q.recipe.RecipeError`; its estimate is in the report)."""
        recipe = self.recipe
        self.report.context.update(plan.report_fields())
        if plan.problems:
            raise RecipeError(plan.problems)
        self.checkpoint = checkpoint = RunCheckpoint.open(
            self.out, recipe, resolve_model_path(recipe.model, recipe.revision), resume, restart, stops,
            distributed.world_size(), distributed.rank())
        placement = {"device": plan.device, "offload": plan.offload, "offload_near": self.out}
        with measure() as loading:
            saved = checkpoint.model_path()
            if saved is None:
                self.console.log(f"loading model '{recipe.model}' ({plan.dtype} on {plan.device})")
                graph = load_graph(recipe.model, plan.dtype, revision=recipe.revision, **placement)
            else:  # verify=False: opening the checkpoint just checked every file of it against its hash
                self.console.log(f"resuming {checkpoint.resumed_from}: loading the checkpointed model '{saved}'")
                graph = load_graph(saved, checkpoint.model_dtype() or plan.dtype, verify=False, **placement)
                graph.source = recipe.model
            if checkpoint.history() is not None:  # stages that left no model copy are in it too
                graph.history = checkpoint.history()
            check_module_finite(graph.model, f"load '{recipe.model}'")
        if checkpoint.completed_groups:
            self.report.rows.extend(checkpoint.report_rows)
        else:
            self.report.rows.append({**size_columns("load", graph), "seconds": loading.seconds,
                                     "peak_rss_mb": loading.peak_rss_mb})
        if checkpoint.resumed_from:
            self.report.context["resumed_from"] = checkpoint.resumed_from
            self.console.log(f"resuming {checkpoint.resumed_from}")
        return graph

    def run_groups(self, graph: ModelGraph) -> ModelGraph:
        """The recipe's stage groups from the checkpoint's next one: a pipeline pass each, a report row per stage,
        a checkpoint after each but the last."""
        contexts = [StageContext.of(self.recipe, spec, self.out, self.report.rows) for spec in self.recipe.stages]
        stages = build_stages(self.recipe, contexts)
        spec_of = {id(stage): spec for stage, spec in zip(stages, self.recipe.stages)}
        windows = CalibrationWindows(self.recipe.calibration)
        groups = plan_groups(stages)
        for index, group in enumerate(groups):
            if index < self.checkpoint.completed_groups:
                continue
            specs = [spec_of[id(stage)] for stage in group]
            graph = self._run_group(graph, index, group, specs, [contexts[spec.index] for spec in specs], windows)
            if index < len(groups) - 1:
                labels = " + ".join(spec.label for spec in specs)
                with self.step(f"checkpoint after {labels}", f"after {labels}", wrap=(CheckpointError, OSError),
                               error=CheckpointError):  # e.g. a full disk: the previous checkpoint stays whole
                    self.checkpoint.group_done(index, graph, self.report.rows,
                                               any(type(spec.config).changes_model for spec in specs), labels)
        return graph

    def finish(self, graph: ModelGraph, keep_checkpoint: bool, show_table: bool) -> RunResult:
        """After the last group: the checkpoint goes (or is kept, marked complete) and the report is complete."""
        with self.step(f"removing the checkpoint '{self.checkpoint.folder.root}'", "at the end",
                       wrap=(CheckpointError, OSError), error=CheckpointError):
            self.checkpoint.finish(keep_checkpoint)
        self.report.context["checkpoint"] = self.checkpoint.summary()
        self.report.context["status"] = "complete"
        if distributed.world_size() > 1:
            self.report.context["distributed"] = distributed.summary()
        self._write(self.report.to_json())
        if show_table and distributed.is_main():
            print_table(self.report.rows, title=f"a3q: {self.recipe.model}", console=Console())
        return RunResult(graph=graph, report=self.report, output_dir=self.out)

    def _run_group(self, graph: ModelGraph, index: int, group: list[CalibratingStage], specs: list[StageSpec],
                   contexts: list[StageContext], windows: CalibrationWindows) -> ModelGraph:
        """One pipeline pass of ``group`` (one stage alone when it does not calibrate), a report row per stage."""
        labels = " + ".join(spec.label for spec in specs)
        calibrating = any(stage.calibrates() for stage in group)
        self.console.log(f"{labels}: running" + (" (one layer-by-layer calibration pass)" if calibrating else ""))
        finished: dict[int, ModelGraph] = {}

        def after_finish(stage: CalibratingStage, finished_graph: ModelGraph) -> None:
            spec, context = next((s, c) for s, c, w in zip(specs, contexts, group) if w is stage)
            context.metrics.update(size_columns(spec.name, finished_graph))  # sizes as this stage left them
            context.metrics.update(stage.metrics)
            if len(group) > 1:
                context.metrics["shared_pass_with"] = [s.label for s in specs if s is not spec]
            if type(spec.config).trains:
                self._repeat_quality_measurement(finished_graph, spec, context)
            finished[spec.index] = finished_graph

        with measure() as measured, self.step(labels, f"during {labels}", named=(CheckpointError,)):
            graph = run_pipeline(graph, windows.get(graph.tokenizer) if calibrating else None, group,
                                 after_finish=after_finish, progress=distributed.is_main(),
                                 checkpoint=self.checkpoint.pass_checkpoint(index, labels) if calibrating else None)
            check_module_finite(graph.model, f"{labels}: output")
        for stage, spec, context in zip(group, specs, contexts):
            graph.history.append({"stage": spec.name, "config": spec.config.model_dump(mode="json")})
            seconds = stage.seconds if len(group) > 1 else measured.seconds
            self.report.rows.append({**size_columns(spec.name, finished[spec.index]), "seconds": seconds,
                                     "peak_rss_mb": measured.peak_rss_mb, **context.metrics})
        if len(group) > 1:
            self.report.rows[-1]["shared_pass_seconds"] = measured.seconds
        self._write(self.report.to_json())
        return graph

    def _repeat_quality_measurement(self, graph: ModelGraph, spec: StageSpec, context: StageContext) -> None:
        """After a training stage: run the last quality-measuring stage before it again; report before → after."""
        measuring = next((s for s in reversed(self.recipe.stages[: spec.index]) if type(s.config).measures_quality),
                         None)
        row = next((r for r in reversed(self.report.rows) if measuring is not None and r.get("stage") == measuring.name
                    and "ppl" in r), None)
        if measuring is None or row is None:
            return
        scratch = StageContext.of(self.recipe, measuring.model_copy(update={"index": spec.index}), self.out,
                                  self.report.rows)
        get_stage(measuring.name).build(measuring.config, scratch).finish(graph)
        after = scratch.metrics
        context.metrics.update(ppl_before=row["ppl"], ppl=after["ppl"], eval=after.get("eval"))
        note = context.metrics.get("note", "")
        context.metrics["note"] = f"{note}, ppl {row['ppl']:.2f}→{after['ppl']:.2f}".lstrip(", ")

    # -- failures and stops ------------------------------------------------------------------------------------------
    @contextmanager
    def step(self, label: str, stopped: str, named: tuple[type[BaseException], ...] = (),
             wrap: tuple[type[Exception], ...] = (Exception,), error: type[Exception] = StageError) -> Iterator[None]:
        """One step of the run: what goes wrong inside is written to ``report.json``, then raised.

        A stop is reported ``stopped`` (``stopped`` says where: ``during …``, with the last checkpoint); ``named``
        errors already say what went wrong and are raised as they are; ``wrap`` errors are raised as ``error("LABEL
        failed: …")``; anything else is reported under ``label`` and raised as it is.
        """
        try:
            yield
        except RunStopped as exc:
            raise self._stopped(exc, stopped) from None
        except named as exc:
            self._fail(str(exc), exc)
            raise
        except wrap as exc:
            self._fail(f"{label}: {exc}", exc)
            raise error(f"{label} failed: {exc}") from exc
        except Exception as exc:
            self._fail(f"{label}: {exc}", exc)
            raise
        except BaseException as exc:  # SystemExit and the like: the report says so before the process goes
            self._fail(f"{label}: interrupted ({type(exc).__name__})", exc)
            raise

    def _fail(self, message: str, exc: BaseException | None = None, status: str = "failed") -> None:
        if self.checkpoint is not None:
            self.report.context["checkpoint"] = self.checkpoint.summary()
        payload = {**self.report.to_json(), "status": status, status: message}
        if exc is not None and not isinstance(exc, (RecipeError, CheckpointRefused, CheckpointError, RunStopped)):
            payload["traceback"] = traceback.format_exception(exc)
        if distributed.world_size() > 1:
            payload["distributed"] = {**distributed.summary(), "failed_rank": distributed.rank()}
        self._write(payload)

    def _stopped(self, exc: RunStopped, where: str) -> RunStopped:
        """The stop as the user sees it: where, and the checkpoint to resume from (the pass's message names it)."""
        checkpoint = self.checkpoint
        resumable = checkpoint is not None and checkpoint.folder.exists()
        message = str(exc) if "checkpoint" in str(exc) else f"stopped by {exc.signal_name} {where}" + (
            f"; the last checkpoint ({checkpoint.saved.get('position', '')}) is in '{checkpoint.folder.root}'"
            if resumable else "")
        self._fail(message, exc, status="stopped")
        if exc.agreed:  # every rank stopped here: none may exit (and have the launcher end the others) before rank 0
            distributed.barrier()  # has written its checkpoint and report.json
        return RunStopped(exc.signal_name, message, agreed=exc.agreed, resumable=resumable)

    def _write(self, payload: dict[str, Any]) -> None:
        """``report.json``, written by rank 0 only (the only process in a one-process run)."""
        if distributed.is_main():
            write_json_atomic(self.out / "report.json", payload)
