"""The stage registry: ``@register_stage("name", Config)`` is all it takes to add a stage.

A stage is a pydantic config class plus a function ``apply(graph, config, context) -> graph``.
The recipe validator looks configs up here, the engine looks functions up here; neither needs
editing when a stage is added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from a3q.engine import StageContext
    from a3q.graph import ModelGraph


class StageConfig(BaseModel):
    """Base of every stage's config: unknown keys are errors, types are not coerced (``'0.2'`` is not a number,
    ``true`` is not an integer), values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, frozen=False)

    #: whether the engine must provide calibration windows to this stage
    needs_calibration: ClassVar[bool] = False
    #: whether this stage's output is no longer a plain float model (quantized weights)
    produces_quantized_weights: ClassVar[bool] = False
    #: whether this stage needs float (unquantized) linear weights as input
    requires_float_weights: ClassVar[bool] = False
    #: whether this stage replaces linears by two-factor low-rank modules (the baselines)
    produces_factored_linears: ClassVar[bool] = False
    #: whether this stage works on a model whose linears are two-factor modules (most rewriting stages do not)
    accepts_factored_linears: ClassVar[bool] = True

    def artifact_target(self) -> str | None:
        """The folder this stage writes an artifact to, if it does (so the engine can check it against the run)."""
        return None

    def text_demands(self, label: str) -> list[tuple[str, str, str, int, int]]:
        """``(field, corpus, split, windows, seq_len)`` for the token windows this stage will cut, so the engine can
        check before the model loads that the corpus holds them; ``field`` is prefixed with ``label``."""
        return []

    def keeps_adapter(self) -> bool:
        """Whether this stage leaves an unmerged adapter on the model (later stages must not rewrite its linears)."""
        return False

    def check_in_recipe(self, earlier: list[Any]) -> list[str]:
        """Problems with this stage given the stages before it (``StageSpec`` list).

        Override for cross-stage rules; the recipe validator prefixes each with the stage's label.
        """
        return []


MAX_SEED = 2**63 - 1
"""Seeds must fit torch's 64-bit generators."""

StageFunction = Callable[["ModelGraph", StageConfig, "StageContext"], "ModelGraph"]


@dataclass(frozen=True)
class StageEntry:
    """A registered stage: its name, config class and implementation."""

    name: str
    config_class: type[StageConfig]
    apply: StageFunction


_STAGES: dict[str, StageEntry] = {}


def register_stage(name: str, config_class: type[StageConfig]) -> Callable[[StageFunction], StageFunction]:
    """Register ``apply`` under ``name`` with its config class (decorator)."""

    def decorator(apply: StageFunction) -> StageFunction:
        existing = _STAGES.get(name)
        if existing is not None and existing.apply.__qualname__ != apply.__qualname__:
            raise ValueError(f"stage '{name}' is already registered by {existing.apply.__module__}")
        _STAGES[name] = StageEntry(name=name, config_class=config_class, apply=apply)
        return apply

    return decorator


_LAYERWISE: dict[str, Callable[[Any], Any]] = {}


def register_layerwise(name: str) -> Callable:
    """Register a factory ``config -> LayerwiseStage | None`` for stage ``name`` (decorator).

    A stage with such a factory can share one layer-by-layer calibration pass with its neighbours in a recipe
    (see :mod:`a3q.calib.layerwise`); the factory returns None for configs that cannot (e.g. A³'s global
    allocation, which needs every layer's statistics before it picks any rank).
    """

    def decorator(factory: Callable[[Any], Any]) -> Callable[[Any], Any]:
        _LAYERWISE[name] = factory
        return factory

    return decorator


def layerwise_part(name: str, config: StageConfig) -> Any:
    """The stage's part in a shared layer-by-layer pass, or None if it has none (for this config)."""
    _load_builtin_stages()
    factory = _LAYERWISE.get(name)
    return None if factory is None else factory(config)


def get_stage(name: str) -> StageEntry:
    """The stage registered under ``name``; KeyError lists the known names."""
    _load_builtin_stages()
    if name not in _STAGES:
        raise KeyError(f"unknown stage '{name}' (known: {', '.join(sorted(_STAGES))})")
    return _STAGES[name]


def stage_names() -> list[str]:
    """All registered stage names, sorted."""
    _load_builtin_stages()
    return sorted(_STAGES)


def _load_builtin_stages() -> None:
    import a3q.stages  # noqa: F401  (importing registers the built-in stages)
