"""The stage registry: ``@register_stage("name", Config)`` is all it takes to add a stage.

A stage is a pydantic config class plus either a function ``apply(graph, config, context) -> graph`` or, for a
stage that calibrates, a :class:`~a3q.pipeline.stage.CalibratingStage` class. The recipe validator looks configs up
here, the engine looks implementations up here; neither needs editing when a stage is added.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from a3q.pipeline.context import StageContext
from a3q.pipeline.stage import CalibratingStage

if TYPE_CHECKING:
    from a3q.calib.sources import TextDemand
    from a3q.graph import ModelGraph
    from a3q.pipeline.plan import ModelShape
    from a3q.recipe import Recipe


class StageConfig(BaseModel):
    """Base of every stage's config: unknown keys are errors, types are not coerced (``'0.2'`` is not a number,
    ``true`` is not an integer), values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, frozen=False)

    #: whether the engine must provide calibration windows to this stage (checked against the corpus up front)
    needs_calibration: ClassVar[bool] = False
    #: whether this stage measures quality (perplexity) on held-out text; a training stage repeats the last one
    measures_quality: ClassVar[bool] = False
    #: whether this stage trains the model: the engine repeats the last quality measurement after it
    trains: ClassVar[bool] = False
    #: whether this stage's output is no longer a plain float model (quantized weights)
    produces_quantized_weights: ClassVar[bool] = False
    #: whether this stage needs float (unquantized) linear weights as input
    requires_float_weights: ClassVar[bool] = False
    #: whether this stage replaces linears by two-factor low-rank modules (the baselines)
    produces_factored_linears: ClassVar[bool] = False
    #: whether this stage works on a model whose linears are two-factor modules (most rewriting stages do not)
    accepts_factored_linears: ClassVar[bool] = True
    #: whether this stage may change the model (False: it only measures or writes it; no checkpoint after it)
    changes_model: ClassVar[bool] = True

    def offload_problem(self) -> str | None:
        """Why this stage cannot run on an offloaded model (decoder layers materialized one at a time), or None.

        Stages that work through the calibration pipeline, and evaluate/export/reload, hold one layer at a time;
        a stage that needs the whole model in memory at once (training, whole-model conversion) says so here.
        """
        return None

    def memory_estimate(self, model: ModelShape, calibration_seq_len: int) -> dict[str, int]:
        """Bytes this stage needs at its peak on top of the model's weights, by component (the memory preflight,
        :mod:`a3q.preflight`, takes each component's largest over the stages).

        Default: ``forward_workspace``, one forward of the stage's batch through a layer (its own ``batch_size`` and
        ``seq_len`` fields when it has them, else 4 windows of the calibration's), with the logits when it
        measures quality.
        """
        batch = getattr(self, "batch_size", CalibratingStage.batch_size) or 1
        seq_len = getattr(self, "seq_len", None) or calibration_seq_len
        return {"forward_workspace": model.forward_bytes(batch, seq_len, logits=self.measures_quality)}

    def memory_advice(self) -> list[str]:
        """Settings of this stage that would shrink what :meth:`memory_estimate` counts (for a refusal's advice)."""
        return []

    def data_parallel_problem(self, world: int) -> str | None:
        """Why this stage cannot run in ``world`` processes (checked before any process starts), or None.

        Default: a training stage cannot (each process would train its own copy); a stage that observes, changes or
        measures layers runs data-parallel through the pipeline.
        """
        if not self.trains:
            return None
        return (f"training stages do not run data-parallel yet ({world} processes would each train their own copy); "
                "run this recipe with one process")

    def changes_kv_ranks(self) -> bool:
        """Whether this stage shrinks the q/k or v/o head dims (what the KV cache stores)."""
        return False

    def quantizes_kv_cache(self) -> bool:
        """Whether this stage sets a quantized KV cache."""
        return False

    def artifact_target(self) -> str | None:
        """The folder this stage writes an artifact to, if it does (so the engine can check it against the run)."""
        return None

    def text_demands(self, label: str) -> list[TextDemand]:
        """A :class:`~a3q.calib.sources.TextDemand` ``(where, source, windows, seq_len)`` for the token windows this
        stage will cut, so the engine can check before the model loads that the source can be read and holds them;
        ``where`` is the asking field prefixed with ``label`` (``f"{label}: max_windows"``)."""
        return []

    def keeps_adapter(self) -> bool:
        """Whether this stage leaves an unmerged adapter on the model (later stages must not rewrite its linears)."""
        return False

    def model_problems(self, model: str, revision: str | None) -> list[str]:
        """Problems of this stage with the recipe's ``model`` (at ``revision``), found without loading it (e.g. from
        its config.json); recipe validation calls this once the model reference itself is known to be good and
        prefixes each problem with the stage's label."""
        return []

    def check_in_recipe(self, earlier: list[Any]) -> list[str]:
        """Problems with this stage given the stages before it (``StageSpec`` list).

        Override for cross-stage rules; the recipe validator prefixes each with the stage's label.
        """
        return []


MAX_SEED = 2**63 - 1
"""Seeds must fit torch's 64-bit generators."""

StageFunction = Callable[["ModelGraph", StageConfig, "StageContext"], "ModelGraph"]


class FunctionStage(CalibratingStage):
    """A stage written as one function ``apply(graph, config, context) -> graph``: it does not calibrate, so the
    engine simply calls it (as this object's :meth:`finish`)."""

    def __init__(self, name: str, apply: StageFunction, config: StageConfig, context: StageContext) -> None:
        super().__init__()
        self.name, self.apply, self.config, self.context = name, apply, config, context

    def calibrates(self) -> bool:
        return False

    def finish(self, graph: ModelGraph) -> ModelGraph:
        return self.apply(graph, self.config, self.context)


@dataclass(frozen=True)
class StageEntry:
    """A registered stage: its name, config class, and implementation (a function or a CalibratingStage class)."""

    name: str
    config_class: type[StageConfig]
    implementation: StageFunction | type[CalibratingStage]

    def build(self, config: StageConfig, context: StageContext) -> CalibratingStage:
        """The stage's worker for one run: a :class:`CalibratingStage` (function stages are wrapped)."""
        if isinstance(self.implementation, type):
            stage = self.implementation(config)
            stage.name = self.name
            return stage
        return FunctionStage(self.name, self.implementation, config, context)


_STAGES: dict[str, StageEntry] = {}


def register_stage(name: str, config_class: type[StageConfig]) -> Callable[[Any], Any]:
    """Register a stage under ``name`` with its config class (decorator).

    Decorate either a function ``apply(graph, config, context) -> graph`` (a stage that does not calibrate) or a
    :class:`~a3q.pipeline.stage.CalibratingStage` subclass built as ``cls(config)``, whose observe/process (and
    optionally plan) the engine's pipeline runs. Nothing else needs editing to add a stage.
    """

    def decorator(implementation: Any) -> Any:
        existing = _STAGES.get(name)
        if existing is not None and existing.implementation.__qualname__ != implementation.__qualname__:
            raise ValueError(f"stage '{name}' is already registered by {existing.implementation.__module__}")
        _STAGES[name] = StageEntry(name=name, config_class=config_class, implementation=implementation)
        return implementation

    return decorator


def get_stage(name: str) -> StageEntry:
    """The stage registered under ``name``; KeyError lists the known names."""
    _load_builtin_stages()
    if name not in _STAGES:
        raise KeyError(f"unknown stage '{name}' (known: {', '.join(sorted(_STAGES))})")
    return _STAGES[name]


def build_stages(recipe: Recipe, contexts: list[StageContext] | None = None) -> list[CalibratingStage]:
    """Every stage of ``recipe`` as its worker for one run, in order; function stages get their context from
    ``contexts`` (default: a fresh :meth:`StageContext.of` each, as tests and checks need)."""
    contexts = contexts if contexts is not None else [StageContext.of(recipe, spec) for spec in recipe.stages]
    return [get_stage(spec.name).build(spec.config, context) for spec, context in zip(recipe.stages, contexts)]


def stage_names() -> list[str]:
    """All registered stage names, sorted."""
    _load_builtin_stages()
    return sorted(_STAGES)


def _load_builtin_stages() -> None:
    """Import the built-in stage modules (named as strings in :mod:`a3q.stages`): they register themselves here,
    so they import this module, and this one reaches them only by name, on first use (a lazy registry, as
    :func:`a3q.arch.family.families` does for families): the registry stays below the stages in the room order."""
    stages = importlib.import_module("a3q.stages")
    for module in stages.BUILTIN_STAGE_MODULES:
        importlib.import_module(module)
