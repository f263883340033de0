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

Every problem is reported at once (up to :data:`MAX_REPORTED_PROBLEMS`), each naming where it is:
``stages[1] (a3): ratio: ...``.

The reader is strict on purpose: a recipe decides what a long run does, so a typo must fail here, not an hour in.
Types are not coerced (``ratio: '0.2'`` and ``max_windows: true`` are errors), duplicate keys and YAML aliases are
refused, and the file must be UTF-8 text of at most :data:`MAX_RECIPE_BYTES`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from a3q.assets.models import looks_like_hub_id
from a3q.calib.sources import TextSourceFields
from a3q.io.model_folder import check_model_reference
from a3q.placement import DEVICE_NAMES, device_problem, is_device_name
from a3q.registry import MAX_SEED, StageConfig, get_stage

MAX_RECIPE_BYTES = 1 << 20
MAX_STAGES = 256
MAX_REPORTED_PROBLEMS = 20

class RecipeError(ValueError):
    """A recipe is invalid; the message lists every problem with its location (the first few, and how many more)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        tail = [f"... and {more} more problem(s)"] if more else []
        super().__init__("invalid recipe:\n  " + "\n  ".join(shown + tail))


class CalibrationConfig(TextSourceFields):
    """Which windows calibrating stages see: ``windows`` random windows of ``seq_len`` tokens of one text source:
    ``corpus`` (+ ``split``; default ``enwiki/calib``), ``path`` or ``dataset`` (see :mod:`a3q.calib.sources`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    default_split: ClassVar[str] = "calib"

    windows: int = Field(32, ge=1, le=100_000)
    seq_len: int = Field(512, ge=2, le=1_000_000)
    seed: int = Field(0, ge=0, le=MAX_SEED)


class _RecipeHeader(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=4096)
    #: a Hub revision (branch, tag or commit) when ``model`` is a Hub id ``org/name``
    revision: str | None = Field(None, min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")
    #: where the model runs: ``auto`` = the first GPU when CUDA is available, else the CPU
    device: str = Field("auto", max_length=64)
    #: ``auto`` = the checkpoint's own dtype on a GPU, float32 on a CPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    calibration: CalibrationConfig = CalibrationConfig()
    stages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_STAGES)
    output: str | None = Field(None, min_length=1, max_length=4096)
    #: keep decoder layers on ``disk`` or in host memory (``cpu``) and load one at a time; ``auto``: only when the
    #: memory preflight says the model does not fit (see a3q.layer_store)
    offload: Literal["none", "cpu", "disk", "auto"] = "auto"
    #: checkpoint the layer-by-layer pass after every this many layers (0: only by time, or not at all)
    checkpoint_every: int = Field(1, ge=0, le=1_000_000)
    #: also checkpoint when this many minutes passed since the last checkpoint
    checkpoint_minutes: float | None = Field(None, gt=0)

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not is_device_name(value):
            raise ValueError(f"'{value}' is not a device name (use {DEVICE_NAMES})")
        return value

    @field_validator("revision")
    @classmethod
    def _revision_name(cls, value: str | None) -> str | None:
        if value is not None and (".." in value or value.endswith("/")):
            raise ValueError(f"'{value}' is not a branch, tag or commit name")
        return value


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
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    calibration: CalibrationConfig
    stages: list[StageSpec]
    output: str | None
    raw: dict[str, Any]
    device: str = "auto"
    revision: str | None = None
    checkpoint_every: int = 1
    checkpoint_minutes: float | None = None
    offload: Literal["none", "cpu", "disk", "auto"] = "auto"

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
    factored_by: StageSpec | None = None
    for spec in stages:
        cls = type(spec.config)
        if factored_by is not None and not cls.accepts_factored_linears:
            problems.append(f"{spec.label}: cannot work on the two-factor low-rank linears of {factored_by.label}; "
                            "put it before that stage, or use a3 instead of a factoring baseline")
        if cls.produces_factored_linears and factored_by is None:
            factored_by = spec
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


def offload_problems(stages: list[StageSpec], mode: str) -> list[str]:
    """One problem per stage that cannot run with decoder layers offloaded (``offload: mode``)."""
    return [f"{spec.label}: cannot run with offload: {mode} ({reason})" for spec in stages
            if (reason := spec.config.offload_problem())]


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
    raw_stages = raw_stages[:MAX_STAGES]  # more is already an error of the header
    for index, raw_stage in enumerate(raw_stages):
        spec, stage_problems = _parse_stage(index, raw_stage)
        problems.extend(stage_problems)
        if spec is not None:
            stages.append(spec)
    if not problems:
        problems.extend(_check_order(stages))
    if header is not None and header.revision is not None and not looks_like_hub_id(header.model):
        problems.append(f"revision: applies to a Hugging Face Hub id (org/name) only, not to '{header.model[:200]}'")
    if header is not None and check_model and not any(p.startswith(("model:", "revision:")) for p in problems):
        reason = check_model_reference(header.model, header.revision)
        if reason:
            problems.append(f"model: {reason}")
        else:
            problems.extend(f"{spec.label}: {problem}" for spec in stages
                            for problem in spec.config.model_problems(header.model, header.revision))
    if header is not None and check_model and not any(p.startswith("device:") for p in problems):
        reason = device_problem(header.device)
        if reason:
            problems.append(f"device: {reason}")
    if header is not None and header.offload in ("cpu", "disk"):
        problems.extend(offload_problems(stages, header.offload))
    if problems or header is None:
        raise RecipeError(problems)
    return Recipe(
        model=header.model,
        dtype=header.dtype,
        calibration=header.calibration,
        stages=stages,
        output=header.output,
        raw=raw,
        device=header.device,
        revision=header.revision,
        checkpoint_every=header.checkpoint_every,
        checkpoint_minutes=header.checkpoint_minutes,
        offload=header.offload,
    )


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and aliases, and reads ``1e-6`` as a number (YAML 1.2)."""

    def compose_node(self, parent, index):  # noqa: ANN001 (PyYAML's signature)
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases (*name) are not supported in recipes; write the value out", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (a later value would silently win)", key_node.start_mark
                )
            seen.add(key) if isinstance(key, (str, int, float, bool)) else None
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_recipe_text(text: str, where: str = "recipe") -> Any:
    """Parse recipe text with the strict loader; problems become a :class:`RecipeError`."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise RecipeError([f"{where}: not valid YAML: {exc}"]) from None
    except RecursionError:
        raise RecipeError([f"{where}: nested too deeply"]) from None


def read_recipe_file(path: Path, what: str = "recipe") -> Any:
    """A recipe-like file's parsed contents (strict YAML/JSON, at most :data:`MAX_RECIPE_BYTES`, UTF-8); problems
    become a :class:`RecipeError` naming ``what`` (``a3q search`` reads its space files with it)."""
    try:
        if not path.is_file():
            raise RecipeError([f"{what} file '{path}' does not exist"])
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError([f"{path}: {size:,} bytes; a {what} may have at most {MAX_RECIPE_BYTES:,}"])
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError([f"{what} file '{path}': {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    return read_recipe_text(text, str(path))


def load_recipe(path: str | Path, check_model: bool = True) -> Recipe:
    """Read and validate a YAML/JSON recipe file (JSON is YAML, so one loader serves both)."""
    return parse_recipe(read_recipe_file(Path(path)), check_model=check_model)
