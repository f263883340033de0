"""Recipes: YAML (or JSON) that chains stages, validated completely before any model loads.

```yaml
model: smollm2-135m
calibration: {corpus: enwiki, split: calib, windows: 32, seq_len: 512, seed: 0}
stages:
  - stage: evaluate
    split: test
  - stage: export
    path: out/smollm2-dense
output: out/demo
```

Every problem is reported at once, each naming where it is: ``stages[1] (a3): ratio: ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from a3q.assets.models import check_model_reference
from a3q.calib.corpus import CORPORA, SPLITS
from a3q.registry import StageConfig, get_stage


class RecipeError(ValueError):
    """A recipe is invalid; the message lists every problem with its location."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid recipe:\n  " + "\n  ".join(problems))


class CalibrationConfig(BaseModel):
    """Which windows calibrating stages see: ``windows`` random windows of ``seq_len`` tokens."""

    model_config = ConfigDict(extra="forbid")

    corpus: Literal[CORPORA] = "enwiki"  # type: ignore[valid-type]
    split: Literal[SPLITS] = "calib"  # type: ignore[valid-type]
    windows: int = Field(32, ge=1, le=100_000)
    seq_len: int = Field(512, ge=2, le=1_000_000)
    seed: int = 0


class _RecipeHeader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    calibration: CalibrationConfig = CalibrationConfig()
    stages: list[dict[str, Any]] = Field(min_length=1)
    output: str | None = None


class StageSpec(BaseModel):
    """One validated stage of a recipe: its registered name and typed config."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    index: int
    name: str
    config: StageConfig

    @property
    def label(self) -> str:
        return f"stages[{self.index}] ({self.name})"


class Recipe(BaseModel):
    """A validated recipe. Build it with :func:`load_recipe` or :func:`parse_recipe`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str
    dtype: Literal["float32", "bfloat16", "float16"]
    calibration: CalibrationConfig
    stages: list[StageSpec]
    output: str | None
    raw: dict[str, Any]

    def needs_calibration(self) -> bool:
        return any(spec.config.needs_calibration for spec in self.stages)


def _format_errors(prefix: str, error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        where = ".".join(str(part) for part in item["loc"])
        problems.append(f"{prefix}{where}: {message}" if where else f"{prefix}{message}")
    return problems


def _parse_stage(index: int, raw: Any) -> tuple[StageSpec | None, list[str]]:
    where = f"stages[{index}]"
    if not isinstance(raw, dict):
        return None, [f"{where}: expected a mapping with a 'stage' key, got {type(raw).__name__}"]
    fields = dict(raw)
    name = fields.pop("stage", None)
    if not isinstance(name, str):
        return None, [f"{where}: missing 'stage' (the stage name)"]
    try:
        entry = get_stage(name)
    except KeyError as exc:
        return None, [f"{where}: {exc.args[0]}"]
    try:
        config = entry.config_class.model_validate(fields)
    except ValidationError as exc:
        return None, _format_errors(f"{where} ({name}): ", exc)
    return StageSpec(index=index, name=name, config=config), []


def _check_order(stages: list[StageSpec]) -> list[str]:
    """Rules that involve several stages, from the flags each stage config declares."""
    problems = []
    quantized_by: StageSpec | None = None
    adapter_by: StageSpec | None = None
    for spec in stages:
        cls = type(spec.config)
        if adapter_by is not None and (cls.produces_quantized_weights or cls.requires_float_weights):
            problems.append(f"{spec.label}: would change the linears under the unmerged adapter of {adapter_by.label} "
                            "(and drop it); set merge: true there, or put this stage before it")
        if quantized_by is not None and cls.produces_quantized_weights:
            problems.append(f"{spec.label}: weights are already quantized by {quantized_by.label}; quantizing twice is not supported")
        elif quantized_by is not None and cls.requires_float_weights:
            problems.append(f"{spec.label}: needs float weights but {quantized_by.label} quantized them; move it before the quantization")
        if cls.produces_quantized_weights and quantized_by is None:
            quantized_by = spec
        if spec.config.keeps_adapter() and adapter_by is None:
            adapter_by = spec
        problems.extend(f"{spec.label}: {p}" for p in spec.config.check_in_recipe(stages[: spec.index]))
    return problems


def parse_recipe(raw: Any, check_model: bool = True) -> Recipe:
    """Validate a recipe given as a dict; raise :class:`RecipeError` listing every problem."""
    if not isinstance(raw, dict):
        raise RecipeError([f"(top level): expected a mapping, got {type(raw).__name__}"])
    problems: list[str] = []
    try:
        header = _RecipeHeader.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_format_errors("", exc))
        header = None
    stages: list[StageSpec] = []
    raw_stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    for index, raw_stage in enumerate(raw_stages):
        spec, stage_problems = _parse_stage(index, raw_stage)
        problems.extend(stage_problems)
        if spec is not None:
            stages.append(spec)
    if not problems:
        problems.extend(_check_order(stages))
    if header is not None and check_model:
        reason = check_model_reference(header.model)
        if reason:
            problems.append(f"model: {reason}")
    if problems or header is None:
        raise RecipeError(problems)
    return Recipe(
        model=header.model,
        dtype=header.dtype,
        calibration=header.calibration,
        stages=stages,
        output=header.output,
        raw=raw,
    )


def load_recipe(path: str | Path, check_model: bool = True) -> Recipe:
    """Read and validate a YAML/JSON recipe file (JSON is YAML, so one loader serves both)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"recipe file '{path}' does not exist"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError([f"{path}: not valid YAML: {exc}"]) from exc
    return parse_recipe(raw, check_model=check_model)
