"""What a running stage reads besides the graph and its config, and where it puts its report fields.

Only function stages (``apply(graph, config, context)``: evaluate, export, reload, lora…) get a context; a
calibrating stage sees only what the pipeline passes it. Stages never fetch calibration data and never see the
recipe or the report: the fields below are all they read, so a stage cannot come to depend on the engine's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from a3q.recipe import Recipe, StageSpec


@dataclass
class StageContext:
    """One stage's view of its run (build one in tests with :meth:`of`)."""

    #: the stage's label in the recipe, ``stages[2] (evaluate)``: progress bars and messages
    label: str
    #: the recipe's ``dtype`` as written (a reload loads its artifact in it)
    dtype: str = "float32"
    #: the stages before this one (a reload without a path finds the last export among them)
    earlier: tuple[StageSpec, ...] = ()
    #: the recipe as written (an export stores it in the artifact's manifest)
    recipe_raw: dict[str, Any] = field(default_factory=dict)
    #: the report's rows so far, the engine's live list (an export stores them in the artifact's manifest)
    report_rows: list[dict[str, Any]] = field(default_factory=list)
    #: the run's output folder (an offloaded reload keeps its store next to it)
    output_dir: Path = Path(".")
    #: what the stage reports: its report row's fields
    metrics: dict[str, Any] = field(default_factory=dict)
    #: the recipe's ``model`` and ``revision``: the model as loaded before any stage (a distilling ``lora`` loads
    #: it again as its teacher); None outside a recipe
    model: str | None = None
    revision: str | None = None

    @classmethod
    def of(cls, recipe: Recipe, spec: StageSpec, output_dir: Path = Path("."),
           report_rows: list[dict[str, Any]] | None = None) -> StageContext:
        """The context of ``spec`` in ``recipe`` (the engine passes its output folder and its report's rows)."""
        return cls(label=spec.label, dtype=recipe.dtype, earlier=tuple(recipe.stages[: spec.index]),
                   recipe_raw=recipe.raw, report_rows=report_rows if report_rows is not None else [],
                   output_dir=output_dir, model=recipe.model, revision=recipe.revision)
