"""The engine: run a recipe (:func:`run_recipe`), or stages on a graph without one (:func:`apply_stages`).

A run, top to bottom:

1. the output folder is prepared and held (:func:`output_lock`: one run per folder), and under ``torchrun`` this
   process joins the others (:mod:`a3q.distributed`);
2. what validation could not check is checked before the model loads (:func:`plan_run`): the output folder, the
   number of processes (:func:`distributed_problems`), the checkpoint to resume, the text (:mod:`a3q.checks`) and
   the memory (:mod:`a3q.preflight`), whose answer is the run's :class:`~a3q.pipeline.plan.RunPlan`;
3. a :class:`~a3q.session.RunSession` loads the model by that plan, runs the stage groups (one pipeline pass each),
   checkpoints after each (:mod:`a3q.checkpoint`) and writes ``report.json`` from start to end, also when the run
   fails or is stopped.

``a3q run --nproc N`` checks the same things once for N processes before it starts any (:func:`launch_problems`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from a3q import distributed
from a3q.checkpoint.run import CheckpointRefused
from a3q.checkpoint.stops import StopSignals
from a3q.checkpoint.store import CheckpointError, CheckpointFolder
from a3q.checks import check_run, check_text
from a3q.graph import ModelGraph
from a3q.io.run_lock import OutputBusyError, OutputFolderError, RunLock, held_by_launcher, prepare_output_folder
from a3q.layer_store.folders import remove_stale_offload_stores
from a3q.pipeline.context import StageContext
from a3q.pipeline.groups import calibration_batch, plan_groups
from a3q.pipeline.plan import RunPlan
from a3q.pipeline.runner import run_pipeline
from a3q.preflight import preflight
from a3q.recipe import CalibrationConfig, Recipe, RecipeError, StageSpec
from a3q.registry import build_stages, get_stage
from a3q.session import RunResult, RunSession, StageError

__all__ = ["RunResult", "StageError", "apply_stage", "apply_stages", "distributed_problems", "launch_problems",
           "output_lock", "plan_run", "run_recipe"]


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
            problems = check_run(recipe, out) + distributed_problems(recipe, world)
            distributed.barrier()  # every process checked the output folder and targets before rank 0 writes into them
            session = RunSession(recipe, out, console)
            with StopSignals() as stops:
                with session.step(f"loading '{recipe.model}'", "while loading the model",
                                  named=(RecipeError, CheckpointRefused, CheckpointError)):
                    plan = plan_run(recipe, out, resume, problems)
                    graph = session.load(plan, stops, resume, restart)
                graph = session.run_groups(graph)
                return session.finish(graph, keep_checkpoint, show_table)
    finally:
        if joined:
            distributed.destroy()


def plan_run(recipe: Recipe, out: Path, resume: bool, problems: list[str]) -> RunPlan:
    """Everything a run checks before its model loads, cheapest first (``problems``: those already found), up to the
    run's plan (whose own problems refuse it when loading). A launcher already counted its processes together: each
    of them then counts once."""
    resume_problem = _resume_problem(out, resume)
    if resume_problem:  # before any text is read
        raise CheckpointRefused(resume_problem)
    problems = problems or check_text(recipe)
    if problems:
        raise RecipeError(problems)
    return preflight(recipe, processes=1 if held_by_launcher(out) else None)


def launch_problems(recipe: Recipe, out: Path, world: int, resume: bool) -> list[str]:
    """What ``a3q run --nproc N`` checks before it starts any process: everything a run checks before loading (the
    output folder, batches per process, the text, the checkpoint to resume), and the memory of N runs at once."""
    problems = check_run(recipe, out) + distributed_problems(recipe, world)
    problems += [problem for problem in [_resume_problem(out, resume)] if problem]
    problems = problems or check_text(recipe)
    if problems:
        return problems
    return preflight(recipe, processes=world).problems


def distributed_problems(recipe: Recipe, world: int) -> list[str]:
    """What a data-parallel run of ``recipe`` cannot do (checked before the model loads, and by ``a3q run --nproc``
    before it starts any process): a calibration too small for every process to get a whole batch, stages that do
    not run data-parallel (:meth:`~a3q.registry.StageConfig.data_parallel_problem`)."""
    if world <= 1:
        return []
    problems = []
    stages = build_stages(recipe)
    if any(stage.calibrates() for stage in stages):
        shares = distributed.WindowShares(recipe.calibration.windows, calibration_batch(stages), world)
        if shares.problem():
            problems.append(f"calibration.windows: {shares.problem()}")
    for spec in recipe.stages:
        problem = spec.config.data_parallel_problem(world)
        if problem:
            problems.append(f"stages[{spec.index}] ({spec.name}): {problem}")
    return problems


def _resume_problem(out: Path, resume: bool) -> str | None:
    if resume and not CheckpointFolder(out / "checkpoint").exists():
        return f"--resume: there is no checkpoint in '{out / 'checkpoint'}'; run without --resume"
    return None


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


def apply_stages(
    graph: ModelGraph, stages: list[tuple[str, Any]], windows: torch.Tensor | None = None
) -> tuple[ModelGraph, list[dict[str, Any]]]:
    """Run stages on ``graph`` outside a recipe (tests, notebooks, benchmarks), grouped into pipeline passes as a run
    groups them: the graph after them and each stage's report fields.

    ``stages`` are ``(name, config)`` pairs, the config a stage config object or a dict of its fields; ``windows``
    are the calibration windows. As in a run, stages change ``graph``'s model in place: pass a copy to keep it.
    """
    specs = []
    for index, (name, config) in enumerate(stages):
        config = get_stage(name).config_class(**config) if isinstance(config, dict) else config
        specs.append(StageSpec(index=index, name=name, config=config))
    recipe = Recipe(model=graph.source, dtype="float32", calibration=CalibrationConfig(), stages=specs, output=None,
                    raw={})
    contexts = [StageContext.of(recipe, spec) for spec in specs]
    workers = build_stages(recipe, contexts)
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
