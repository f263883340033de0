"""The engine: load the model, run each stage in order, record a report row per stage.

Stages never run the model over calibration data themselves: consecutive calibrating stages form one group that
the pipeline (:mod:`a3q.pipeline.runner`) runs layer by layer over the recipe's calibration windows, cut once per
run; other stages are called as they are. After a training stage the engine repeats the recipe's last quality
measurement, so the report shows before → after.
``report.json`` is written (atomically) when the run starts (``status: running``) and after every stage, and ends
``complete``, ``failed`` or ``stopped`` (with the reason), so a failed or killed run still shows how far it got.

Before the model loads, the engine checks what validation could not (:mod:`a3q.checks`: the output folder, the
text; :mod:`a3q.preflight`: memory) and opens the run's checkpoint folder (:mod:`a3q.checkpoint`: ``--resume``
continues a run from its last checkpoint). The model is checked for non-finite values after loading and after every
stage (:mod:`a3q.numerics`).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from a3q import __version__, distributed
from a3q.assets.cache import write_json_atomic
from a3q.assets.models import resolve_model_path
from a3q.checkpoint.run import CheckpointRefused, RunCheckpoint
from a3q.checkpoint.stops import RunStopped, StopSignals
from a3q.checkpoint.store import CheckpointError, CheckpointFolder
from a3q.calib.windows import random_windows
from a3q.graph import ModelGraph
from a3q.io.loading import load_graph
from a3q.io.run_lock import (OutputBusyError, OutputFolderError, RunLock, held_by_launcher,
                             prepare_output_folder)
from a3q.numerics import check_module_finite
from a3q.offload import remove_stale_offload_stores
from a3q.recipe import Recipe, RecipeError
from a3q.pipeline.runner import run_pipeline
from a3q.pipeline.stage import CalibratingStage
from a3q.checks import check_run, check_text
from a3q.preflight import preflight
from a3q.passes import (StageContext, apply_stage, apply_stages, graph_row, plan_groups,  # noqa: F401 (API)
                        repeat_quality_measurement)
from a3q.registry import get_stage
from a3q.report import Report, measure, print_table


class StageError(RuntimeError):
    """A stage (or loading the model) failed while running; the message names it."""


class CalibrationWindows:
    """The recipe's calibration windows, cut once per run (with the model's tokenizer) and shared by every pass.

    In a data-parallel run every process cuts the same windows (same text, same seed; checked across processes) and
    the pipeline gives each its share in whole batches (:func:`a3q.distributed.shard`); the probes of global
    allocation use the windows unsharded.
    """

    def __init__(self, recipe: Recipe, batch_size: int = 1) -> None:
        self.recipe, self.batch_size = recipe, batch_size  # the largest batch of any pass: the fewest batches
        self._windows: torch.Tensor | None = None

    def get(self, graph: ModelGraph) -> torch.Tensor:
        if self._windows is None:
            cal = self.recipe.calibration
            self._windows = random_windows(graph.tokenizer, cal.source(), cal.seq_len, cal.windows, cal.seed)
            distributed.check_same_everywhere(self._windows, "the calibration windows")
            # fails early (before the first pass), naming windows, batch size and processes, if some rank would get
            # no whole batch in some pass
            distributed.shard(self._windows, self.batch_size)
        return self._windows


@dataclass
class RunResult:
    """The model after the last stage, and the report of the run."""

    graph: ModelGraph
    report: Report
    output_dir: Path


def run_recipe(
    recipe: Recipe, output_dir: str | Path | None = None, console: Console | None = None, show_table: bool = True,
    resume: bool = False, restart: bool = False, keep_checkpoint: bool = False,
) -> RunResult:
    """Run every stage of ``recipe``; write ``report.json`` into the output folder.

    Raises :class:`~a3q.recipe.RecipeError` (or :class:`~a3q.checkpoint.run.CheckpointRefused`) for problems found
    before the model loads, :class:`StageError` for a failure while loading or running a stage and
    :class:`~a3q.checkpoint.stops.RunStopped` for SIGINT/SIGTERM; in every case ``report.json`` ends ``failed`` or
    ``stopped`` with the reason. Checkpoints go to ``OUT/checkpoint`` (:mod:`a3q.checkpoint`): ``resume`` continues
    from the last one, ``restart`` discards it, ``keep_checkpoint`` keeps it after success.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the run is data-parallel (:mod:`a3q.distributed`): every process loads
    the model and observes its share of the calibration windows, statistics are summed across processes, and only
    rank 0 writes ``report.json``, checkpoints and artifacts; ``resume`` reads the checkpoint on every rank.
    """
    world = distributed.env_world_size()
    out = prepare_output_folder(Path(output_dir or recipe.output or "out/run"))
    joined = distributed.init(distributed.rank_device(recipe.device))
    try:
        with output_lock(out):
            return _run_recipe(recipe, out, console, show_table, resume, restart, keep_checkpoint, world)
    finally:
        if joined:
            distributed.destroy()


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``out`` for this run (:mod:`a3q.io.run_lock`): one run per output folder. In a data-parallel run the
    launcher holds it (or, under a bare ``torchrun``, rank 0 takes it) and every rank learns whether it could."""
    lock = RunLock(out)
    problem = None
    if distributed.is_main() and not held_by_launcher(out):
        try:
            lock.acquire()
        except (OutputBusyError, OutputFolderError) as exc:
            problem = (type(exc).__name__, str(exc))
    problem = distributed.broadcast_object(problem)
    if problem is not None:
        raise (OutputBusyError if problem[0] == "OutputBusyError" else OutputFolderError)(problem[1])
    try:
        if distributed.is_main():  # nobody else can be using them: this run holds the folder
            remove_stale_offload_stores(out)
        yield
    finally:
        lock.release()


def _write_report(path: Path, payload: dict[str, Any]) -> None:
    """``report.json``, written by rank 0 only (the only process in a one-process run)."""
    if distributed.is_main():
        write_json_atomic(path, payload)


def distributed_problems(recipe: Recipe, world: int) -> list[str]:
    """What a data-parallel run of ``recipe`` cannot do (checked before the model loads, and by ``a3q run --nproc``
    before it starts any process): a calibration too small for every process to get a whole batch, training stages
    that do not run data-parallel."""
    if world <= 1:
        return []
    problems = []
    calibrating = [spec for spec in recipe.stages if spec.config.needs_calibration]
    if calibrating:
        windows = recipe.calibration.windows
        batch = max(getattr(spec.config, "batch_size", CalibratingStage.batch_size) for spec in calibrating)
        batches = -(-windows // batch)
        if batches < world:
            problems.append(f"calibration.windows: {windows} window(s) in batches of {batch} make {batches} batch(es), "
                            f"too few for {world} processes (every process needs a whole batch): set "
                            f"calibration.windows ≥ {(world - 1) * batch + 1}, a smaller batch_size, or at most "
                            f"--nproc {max(1, batches)}")
    for spec in (spec for spec in recipe.stages if type(spec.config).trains):
        check = getattr(spec.config, "data_parallel_problem", None)  # a training stage that runs under DDP (lora)
        problem = check(world) if check is not None else (
            f"training stages do not run data-parallel yet ({world} processes would each train their own copy); run "
            "this recipe with one process")
        if problem:
            problems.append(f"stages[{spec.index}] ({spec.name}): {problem}")
    return problems


def launch_problems(recipe: Recipe, out: Path, world: int, resume: bool) -> list[str]:
    """What ``a3q run --nproc N`` checks before it starts any process: everything a run checks before loading (the
    output folder, batches per process, the text, the checkpoint to resume), and the memory of N runs at once."""
    problems = check_run(recipe, out) + distributed_problems(recipe, world)
    if resume and not CheckpointFolder(out / "checkpoint").exists():
        problems.append(f"--resume: there is no checkpoint in '{out / 'checkpoint'}'; run without --resume")
    return problems or check_text(recipe) or preflight(recipe, {}, processes=world)


def _run_recipe(recipe: Recipe, out: Path, console: Console | None, show_table: bool,
                resume: bool, restart: bool, keep_checkpoint: bool, world: int) -> RunResult:
    main = distributed.is_main()
    console = console or Console(stderr=True, quiet=not main)
    problems = check_run(recipe, out) + distributed_problems(recipe, world)
    distributed.barrier()  # every process checked the output folder and targets before rank 0 writes into them
    report = Report(context={"a3q_version": __version__, "status": "running", "model": recipe.model,
                             "recipe": recipe.raw, "world_size": distributed.world_size()})
    _write_report(out / "report.json", report.to_json())
    checkpoint: RunCheckpoint | None = None

    def fail(message: str, exc: BaseException | None = None, status: str = "failed") -> None:
        if checkpoint is not None:
            report.context["checkpoint"] = checkpoint.summary()
        payload = {**report.to_json(), "status": status, status: message}
        if exc is not None and not isinstance(exc, (RecipeError, CheckpointRefused, CheckpointError, RunStopped)):
            payload["traceback"] = traceback.format_exception(exc)
        if distributed.world_size() > 1:
            payload["distributed"] = {**distributed.summary(), "failed_rank": distributed.rank()}
        _write_report(out / "report.json", payload)

    def stopped(exc: RunStopped, where: str) -> RunStopped:
        resumable = checkpoint is not None and checkpoint.folder.exists()
        message = str(exc) if "checkpoint" in str(exc) else f"stopped by {exc.signal_name} {where}" + (
            f"; the last checkpoint ({_position_of(checkpoint)}) is in '{checkpoint.folder.root}'" if resumable else "")
        fail(message, exc, status="stopped")
        if exc.agreed:  # every rank stopped here: none may exit (and have the launcher end the others) before rank 0
            distributed.barrier()  # has written its checkpoint and report.json
        result = RunStopped(exc.signal_name, message)
        result.resumable, result.agreed = resumable, exc.agreed
        return result

    with StopSignals() as stops:
        try:
            if resume and not CheckpointFolder(out / "checkpoint").exists():  # before any text is read
                raise CheckpointRefused(f"--resume: there is no checkpoint in '{out / 'checkpoint'}'; run without "
                                        "--resume")
            # memory; device/dtype (a launcher already checked its processes together: each then counts once)
            problems = problems or check_text(recipe) or preflight(recipe, report.context,
                                                                   processes=1 if held_by_launcher(out) else None)
            if problems:
                raise RecipeError(problems)
            checkpoint = RunCheckpoint.open(out, recipe, resolve_model_path(recipe.model, recipe.revision), resume,
                                            restart, stops, distributed.world_size(), distributed.rank())
            with measure() as loading:
                saved_model = checkpoint.model_path()
                console.log(f"loading model '{recipe.model}' ({report.context.get('dtype', recipe.dtype)} on "
                            f"{report.context.get('device', recipe.device)})" if saved_model is None else
                            f"resuming {checkpoint.resumed_from}: loading the checkpointed model '{saved_model}'")
                offload = {"offload": report.context.get("offload", "none"), "offload_near": out}
                if saved_model is None:
                    graph = load_graph(recipe.model, recipe.dtype, device=distributed.rank_device(recipe.device),
                                       revision=recipe.revision, **offload)
                else:  # verify=False: opening the checkpoint just checked every file of it against its hash
                    graph = load_graph(saved_model, checkpoint.model_dtype() or recipe.dtype, verify=False,
                                       device=distributed.rank_device(recipe.device), **offload)
                    graph.source = recipe.model
                if checkpoint.history() is not None:  # stages that left no model copy are in it too
                    graph.history = checkpoint.history()
                check_module_finite(graph.model, f"load '{recipe.model}'")
        except (RecipeError, CheckpointRefused, CheckpointError) as exc:
            fail(str(exc), exc)
            raise
        except RunStopped as exc:
            raise stopped(exc, "while loading the model") from None
        except BaseException as exc:
            fail(f"load: {exc}" if isinstance(exc, Exception) else f"load: interrupted ({type(exc).__name__})", exc)
            if isinstance(exc, Exception):
                raise StageError(f"loading '{recipe.model}' failed: {exc}") from exc
            raise
        if checkpoint.completed_groups:
            report.rows.extend(checkpoint.report_rows)
        else:
            report.rows.append({**graph_row("load", graph), "seconds": loading.seconds,
                                "peak_rss_mb": loading.peak_rss_mb})
        if checkpoint.resumed_from:
            report.context["resumed_from"] = checkpoint.resumed_from
            console.log(f"resuming {checkpoint.resumed_from}")
        graph = _run_groups(recipe, graph, out, report, checkpoint, console, fail, stopped)
        try:
            checkpoint.finish(keep_checkpoint)
        except (CheckpointError, OSError) as exc:
            fail(f"removing the checkpoint: {exc}", exc)
            raise CheckpointError(f"the run finished, but removing '{checkpoint.folder.root}' failed: {exc}") from exc
        report.context["checkpoint"] = checkpoint.summary()
    report.context["status"] = "complete"
    if distributed.world_size() > 1:
        report.context["distributed"] = distributed.summary()
    _write_report(out / "report.json", report.to_json())
    if show_table and main:
        print_table(report.rows, title=f"a3q: {recipe.model}", console=Console())
    return RunResult(graph=graph, report=report, output_dir=out)


def _run_groups(recipe: Recipe, graph: ModelGraph, out: Path, report: Report, checkpoint: RunCheckpoint,
                console: Console, fail: Callable[..., None], stopped: Callable[..., RunStopped]) -> ModelGraph:
    """Run the recipe's stage groups from the checkpoint's next one: one pipeline pass each, a report row per stage."""
    contexts = {spec.index: StageContext(recipe, spec, out, report) for spec in recipe.stages}
    workers = [get_stage(spec.name).build(spec.config, contexts[spec.index]) for spec in recipe.stages]
    calibration = CalibrationWindows(recipe, max((w.batch_size for w in workers if w.calibrates()), default=1))
    spec_of = {id(worker): spec for worker, spec in zip(workers, recipe.stages)}
    groups = plan_groups(workers)
    for group_index, group in enumerate(groups):
        if group_index < checkpoint.completed_groups:
            continue
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
                repeat_quality_measurement(finished_graph, context)
            finished[spec.index] = finished_graph

        with measure() as measured:
            try:
                windows = calibration.get(graph) if calibrating else None
                graph = run_pipeline(graph, windows, group, after_finish=after_finish, progress=distributed.is_main(),
                                     checkpoint=checkpoint.pass_checkpoint(group_index, labels) if calibrating else None)
                check_module_finite(graph.model, f"{labels}: output")
            except RunStopped as exc:
                raise stopped(exc, f"during {labels}") from None
            except CheckpointError as exc:  # a checkpointed pass that cannot be restored: named, one line
                fail(str(exc), exc)
                raise
            except Exception as exc:
                fail(f"{labels}: {exc}", exc)
                raise StageError(f"{labels} failed: {exc}") from exc
            except BaseException as exc:  # SystemExit and the like: the report says so before the process goes
                fail(f"{labels}: interrupted ({type(exc).__name__})", exc)
                raise
        for worker, spec in zip(group, specs):
            graph.history.append({"stage": spec.name, "config": spec.config.model_dump(mode="json")})
            seconds = worker.seconds if len(group) > 1 else measured.seconds
            report.rows.append({**graph_row(spec.name, finished[spec.index]), "seconds": seconds,
                                "peak_rss_mb": measured.peak_rss_mb, **contexts[spec.index].metrics})
        if len(group) > 1:
            report.rows[-1]["shared_pass_seconds"] = measured.seconds
        _write_report(out / "report.json", report.to_json())
        if group_index < len(groups) - 1:
            try:
                checkpoint.group_done(group_index, graph, report.rows,
                                      any(type(spec.config).changes_model for spec in specs), labels)
            except RunStopped as exc:
                raise stopped(exc, f"after {labels}") from None
            except (CheckpointError, OSError) as exc:  # e.g. a full disk: the previous checkpoint stays whole
                fail(f"checkpoint after {labels}: {exc}", exc)
                raise CheckpointError(f"checkpoint after {labels} failed: {exc}") from exc
    return graph


def _position_of(checkpoint: RunCheckpoint | None) -> str:
    return str(checkpoint.saved.get("position", "")) if checkpoint is not None else ""
