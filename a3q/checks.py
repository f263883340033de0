"""Checks that need the run's output folder or the text, made after validation and before the model loads.

Recipe validation (:mod:`a3q.recipe`) reads no text and knows no output folder; these two checks do, so that a run
that cannot finish fails in seconds, not after loading a model: :func:`check_run` (an export onto the run's own
output folder) and :func:`check_text` (every text source read and tokenized, with enough tokens for its windows).
The memory check is :mod:`a3q.preflight`.
"""

from __future__ import annotations

from pathlib import Path

from a3q.calib.sources import TextDemand
from a3q.calib.windows import text_peak_bytes, window_shortfalls
from a3q.io.loading import load_tokenizer
from a3q.recipe import Recipe


def check_run(recipe: Recipe, out: Path) -> list[str]:
    """Problems that depend on where the run writes (known only at run time): an export that would replace the
    folder holding this run's report, or a folder above it."""
    problems = []
    for spec in recipe.stages:
        target = spec.config.artifact_target()
        if target is None:
            continue
        resolved = Path(target).resolve()
        checkpoints = out / "checkpoint"
        if resolved == out or resolved in out.parents:
            problems.append(f"{spec.label}: path: '{target}' is (or contains) the run's output folder '{out}', "
                            "where report.json goes; export somewhere else")
        elif resolved == checkpoints or checkpoints in resolved.parents:
            problems.append(f"{spec.label}: path: '{target}' is inside '{checkpoints}', which the run replaces and "
                            "removes; export somewhere else")
    return problems


def text_demands(recipe: Recipe) -> list[TextDemand]:
    """Every text demand of the recipe: its stages' (evaluation windows, in order) and the calibration's (random
    windows, drawn from all of the source's)."""
    demands = [demand for spec in recipe.stages for demand in spec.config.text_demands(spec.label)]
    if any(spec.config.needs_calibration for spec in recipe.stages):
        cal = recipe.calibration
        demands.append(TextDemand("calibration.windows", cal.source(), cal.windows, cal.seq_len, random=True))
    return demands


def check_text(recipe: Recipe) -> list[str]:
    """Whether the text sources can be read and hold the windows the recipe asks for (loads the tokenizer only: it
    reads and tokenizes, streamed, all of the calibration source, whose token count the run then reuses, and each
    evaluation source as far as its windows need; chat records through the tokenizer's chat template)."""
    demands = text_demands(recipe)
    if not demands:
        return []
    return window_shortfalls(load_tokenizer(recipe.model, recipe.revision), demands)


def text_bytes(recipe: Recipe) -> int:
    """Host bytes the recipe's text needs at its peak (for the memory preflight): the calibration windows, kept for
    the run, plus the largest evaluation's windows and reading buffers (:func:`a3q.calib.windows.text_peak_bytes`;
    bounded by the windows, never by the size of the files)."""
    demands = text_demands(recipe)
    if not demands:
        return 0
    tokenizer = load_tokenizer(recipe.model, recipe.revision)
    peaks = [(demand.random, text_peak_bytes(tokenizer, demand.source, demand.seq_len, demand.windows))
             for demand in demands]
    return sum(peak for random, peak in peaks if random) + max((peak for random, peak in peaks if not random),
                                                               default=0)
