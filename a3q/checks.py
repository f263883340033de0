"""Checks that need the run's output folder or the text, made after validation and before the model loads.

Recipe validation (:mod:`a3q.recipe`) reads no text and knows no output folder; these two checks do, so that a run
that cannot finish fails in seconds, not after loading a model: :func:`check_run` (an export onto the run's own
output folder) and :func:`check_text` (every text source read and tokenized, with enough tokens for its windows).
The memory check is :mod:`a3q.preflight`.
"""

from __future__ import annotations

from pathlib import Path

from a3q.calib.windows import window_shortfalls
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


def check_text(recipe: Recipe) -> list[str]:
    """Whether the text sources can be read and hold the windows the recipe asks for (loads the tokenizer only:
    it reads and tokenizes every source, chat records through the tokenizer's chat template)."""
    from transformers import AutoTokenizer

    from a3q.assets.models import resolve_model_path
    from a3q.calib.sources import TextDemand

    demands = [demand for spec in recipe.stages for demand in spec.config.text_demands(spec.label)]
    if any(spec.config.needs_calibration for spec in recipe.stages):
        cal = recipe.calibration
        demands.append(TextDemand("calibration.windows", cal.source(), cal.windows, cal.seq_len))
    if not demands:
        return []
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(recipe.model, recipe.revision)))
    return window_shortfalls(tokenizer, demands)
