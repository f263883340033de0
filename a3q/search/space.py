"""The search space file: model, text sources, budget and axes, validated in full before anything loads.

```yaml
model: smollm2-135m
calibration: {corpus: enwiki, split: calib, windows: 16, seq_len: 512, seed: 0}
evaluate: {corpus: enwiki, split: test, seq_len: 512, max_windows: 8}
budget: {bits_per_param: 3.5}     # and/or weight_bytes, kv_bytes_per_token, max_ppl
# every axis below is optional (these are the defaults):
a3: {ratios: [0.0, 0.1, 0.2, 0.3], allocation: [global]}
weights: [none, {gptq: {bits: 8}}, {gptq: {bits: 4, group_size: 64}}, {gptq: {bits: 4}},
          {gptq: {bits: 3, group_size: 64}}, {gptq: {bits: 3}}, {bnb: {quant_type: nf4}}, {bnb: {quant_type: int8}}]
kv: [none]                        # entries are kv stage fields, e.g. {kv_ratio: 0.3} or {bits: 8}
evaluate_top: 6                   # candidates built and measured for real, best proxy first
```

Candidates are the product of the axes. Each weights entry names at most one quantizer (``gptq`` or ``bnb``) with
that stage's own fields; a KV entry holds ``kv`` stage fields. The file is refused, each problem naming its field,
for: unknown fields and wrong types (as a recipe), an empty space, conflicting axes (two quantizers in one entry, a
quantized KV cache that ``evaluate`` cannot measure without ``cache_chunk``), a budget no candidate can meet (the
message gives the smallest reachable value, computed from config.json) and any candidate whose recipe
:func:`a3q.recipe.parse_recipe` refuses (which runs every stage's ``model_problems``).

The default KV axis is ``[none]`` unless the budget names ``kv_bytes_per_token``: then the cache settings that meet
it are needed, and the default adds 30% and 50% KV-rank cuts, and 8- and 4-bit caches when ``evaluate`` sets
``cache_chunk`` (the only evaluation that measures a quantized cache).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from a3q.io.model_folder import check_model_reference, config_json
from a3q.placement import DEVICE_NAMES, is_device_name, resolve_dtype
from a3q.recipe import CalibrationConfig, RecipeError, parse_recipe, read_recipe_file
from a3q.registry import get_stage
from a3q.search.candidate import Candidate, frozen
from a3q.search.sizes import ModelShape, SizeEstimate, estimate, model_shape
from a3q.stages.evaluate import EvaluateConfig

WEIGHT_STAGES = ("gptq", "bnb")
DEFAULT_RATIOS = [0.0, 0.1, 0.2, 0.3]
DEFAULT_WEIGHTS: list[Any] = [
    "none", {"gptq": {"bits": 8}}, {"gptq": {"bits": 4, "group_size": 64}}, {"gptq": {"bits": 4}},
    {"gptq": {"bits": 3, "group_size": 64}}, {"gptq": {"bits": 3}}, {"bnb": {"quant_type": "nf4"}},
    {"bnb": {"quant_type": "int8"}},
]
#: the KV axis when the budget names kv_bytes_per_token: rank cuts, and quantized caches when ``evaluate`` can
#: measure them (``cache_chunk``: only a cache-fed evaluation sees a quantized cache)
DEFAULT_KV_RANKS: list[Any] = ["none", {"kv_ratio": 0.3}, {"kv_ratio": 0.5}]
DEFAULT_KV_BITS: list[Any] = [{"bits": 8}, {"bits": 4}, {"kv_ratio": 0.3, "bits": 8}]
MAX_CANDIDATES = 2000
SIZE_BUDGETS = ("bits_per_param", "weight_bytes", "kv_bytes_per_token")


class SpaceError(RecipeError):
    """An invalid space file; the message lists every problem, each naming its field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        self.args = (str(self.args[0]).replace("invalid recipe:", "invalid search space:", 1),)


class Budget(BaseModel):
    """What the pick must meet; at least one field. Sizes are of the decoder's linear layers (see sizes.py)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    bits_per_param: float | None = Field(None, gt=0, le=64)
    weight_bytes: int | None = Field(None, gt=0)
    kv_bytes_per_token: float | None = Field(None, gt=0)
    max_ppl: float | None = Field(None, gt=1)

    def given(self) -> dict[str, float]:
        return {name: value for name, value in self.model_dump().items() if value is not None}

    def size_problems(self, size: SizeEstimate) -> list[str]:
        """The size budgets ``size`` breaks (empty: it fits)."""
        measured = {"bits_per_param": size.bits_per_param, "weight_bytes": size.linear_bytes,
                    "kv_bytes_per_token": size.kv_bytes_per_token}
        return [f"{name} {_number(measured[name])} > {_number(limit)}" for name in SIZE_BUDGETS
                if (limit := getattr(self, name)) is not None and measured[name] > limit * (1 + 1e-12)]


def _number(value: float) -> str:
    """``12,816`` for sizes in bytes, ``2.251`` for bits per parameter."""
    return f"{value:,.0f}" if value >= 1000 else f"{value:.4g}"


class A3Axis(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    ratios: list[float] = Field(default_factory=lambda: list(DEFAULT_RATIOS), max_length=64)
    allocation: list[Literal["uniform", "global"]] = Field(default_factory=lambda: ["global"], max_length=2)


class SearchSpace(BaseModel):
    """A validated space file. Build it with :func:`parse_space` or :func:`load_space`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=4096)
    revision: str | None = Field(None, min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")
    device: str = Field("auto", max_length=64)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    calibration: CalibrationConfig = CalibrationConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    budget: Budget
    a3: A3Axis = A3Axis()
    #: entries are checked one by one in _axis_problems (so a message says "weights[2]", not pydantic's union path)
    weights: list[Any] = Field(default_factory=lambda: list(DEFAULT_WEIGHTS), max_length=256)
    kv: list[Any] | None = Field(None, max_length=256)
    evaluate_top: int = Field(6, ge=1, le=1000)

    def kv_entries(self) -> list[str | dict[str, Any]]:
        if self.kv is not None:
            return self.kv
        if self.budget.kv_bytes_per_token is None:
            return ["none"]
        return DEFAULT_KV_RANKS + (DEFAULT_KV_BITS if self.evaluate.cache_chunk is not None else [])

    def _axes(self) -> tuple[list, list]:
        weights = list(dict.fromkeys(_weight_fields(entry) for entry in self.weights))
        kvs = list(dict.fromkeys(
            None if entry == "none" else tuple(sorted((k, frozen(v)) for k, v in {"stage": "kv", **entry}.items()))
            for entry in self.kv_entries()))
        return weights, kvs

    def count(self) -> int:
        """How many candidates :meth:`candidates` gives, without building them (a hostile space must not make
        millions of objects before it is refused)."""
        weights, kvs = self._axes()
        ratios = set(self.a3.ratios)
        a3_points = len(ratios - {0}) * len(set(self.a3.allocation)) + (0 in ratios)
        return a3_points * len(weights) * len(kvs)

    def candidates(self) -> list[Candidate]:
        """Every point of the space, in a fixed order (axes' order)."""
        weights, kvs = self._axes()
        points: list[Candidate] = []
        for ratio, allocation, weight, kv in itertools.product(self.a3.ratios, self.a3.allocation, weights, kvs):
            if ratio == 0 and allocation != self.a3.allocation[0]:
                continue  # without A³ the allocation means nothing: one dense point, not one per allocation
            points.append(Candidate(a3_ratio=ratio, allocation=allocation, weights=weight, kv=kv))
        return list(dict.fromkeys(points))

    def float_bytes(self) -> int:
        """Bytes of a float weight in the artifacts this space's runs write (``dtype``; ``auto``: by device)."""
        config = config_json(self.model, self.revision)
        dtype = resolve_dtype(self.dtype, config, "cpu" if self.device == "cpu" else self.device)
        return dtype.itemsize

    def recipe_for(self, candidate: Candidate, model: str | None = None,
                   stages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A complete recipe (without export) that builds ``candidate`` from ``model`` (default: the space's) with
        ``stages`` (default: all of the candidate's), then evaluates it on the space's held-out text."""
        evaluate = {"stage": "evaluate", **self.evaluate.model_dump(exclude_unset=True)}
        return {**self.header(model), "stages": [*(candidate.stages() if stages is None else stages), evaluate]}

    def header(self, model: str | None = None) -> dict[str, Any]:
        """The recipe header every run of this search shares; ``model`` replaces the space's (a built A³ artifact,
        which has no revision)."""
        head = {"model": model or self.model, "device": self.device, "dtype": self.dtype,
                "calibration": self.calibration.model_dump(exclude_unset=True)}
        return {**head, "revision": self.revision} if model is None and self.revision is not None else head


def _weight_fields(entry: str | dict[str, Any]) -> tuple[tuple[str, Any], ...] | None:
    if entry == "none":
        return None
    (stage, fields), = entry.items()
    return tuple(sorted((k, frozen(v)) for k, v in {"stage": stage, **fields}.items()))


def _format(prefix: str, error: ValidationError) -> list[str]:
    """One line per error: ``prefix`` + the field's dotted path (``prefix`` ends with "." when a path follows)."""
    lines = []
    for item in error.errors():
        where = prefix + ".".join(str(part) for part in item["loc"])
        lines.append(f"{where.rstrip('.')}: {item['msg'].removeprefix('Value error, ')}")
    return lines


def _axis_problems(space: SearchSpace) -> list[str]:
    """Empty axes, malformed or conflicting entries: everything checkable without the model."""
    problems = []
    if not space.a3.ratios:
        problems.append("a3.ratios: empty space: give at least one ratio (0.0 = no A³)")
    if not space.a3.allocation:
        problems.append("a3.allocation: empty space: give uniform and/or global")
    problems.extend(f"a3.ratios[{i}]: {r} is outside [0, 1)" for i, r in enumerate(space.a3.ratios) if not 0 <= r < 1)
    if not space.weights:
        problems.append("weights: empty space: give at least one entry ('none' = float weights)")
    for i, entry in enumerate(space.weights):
        where = f"weights[{i}]"
        if not isinstance(entry, (str, dict)):
            problems.append(f"{where}: expected none or a mapping {{gptq: {{...}}}} / {{bnb: {{...}}}}, got "
                            f"{type(entry).__name__}")
            continue
        if isinstance(entry, str):
            if entry != "none":
                problems.append(f"{where}: '{entry}' is not an entry: use none or {{gptq: {{...}}}} / {{bnb: {{...}}}}")
            continue
        unknown = sorted(set(entry) - set(WEIGHT_STAGES))
        if unknown:
            problems.append(f"{where}: unknown quantizer {', '.join(unknown)} (use {' or '.join(WEIGHT_STAGES)})")
        elif len(entry) != 1:
            problems.append(f"{where}: conflicting axes: {' and '.join(sorted(entry))} in one entry; a candidate "
                            f"quantizes its weights once: give each quantizer its own entry")
        else:
            (stage, fields), = entry.items()
            problems.extend(_stage_problems(f"{where}.{stage}", stage, fields))
    kv_entries = space.kv_entries()
    if not kv_entries:
        problems.append("kv: empty space: give at least one entry ('none' = the model's cache)")
    for i, entry in enumerate(kv_entries):
        if not isinstance(entry, (str, dict)):
            problems.append(f"kv[{i}]: expected none or a mapping of kv stage fields, got {type(entry).__name__}")
            continue
        if isinstance(entry, str):
            if entry != "none":
                problems.append(f"kv[{i}]: '{entry}' is not an entry: use none or kv stage fields")
            continue
        problems.extend(_stage_problems(f"kv[{i}]", "kv", entry))
        if "bits" in entry and space.evaluate.cache_chunk is None:
            problems.append(f"kv[{i}].bits: conflicting axes: a quantized cache is only measured through the cache; "
                            f"set evaluate.cache_chunk (e.g. 128), or drop bits")
    return problems


def _stage_problems(where: str, stage: str, fields: Any) -> list[str]:
    if not isinstance(fields, dict):
        return [f"{where}: expected a mapping of {stage} stage fields, got {type(fields).__name__}"]
    if "stage" in fields:
        return [f"{where}.stage: not a field here (the entry's key names the stage)"]
    try:
        get_stage(stage).config_class.model_validate(fields)
    except ValidationError as exc:
        return _format(f"{where}.", exc)
    return []


def budget_problems(space: SearchSpace, sizes: dict[Candidate, SizeEstimate]) -> list[str]:
    """Refuse a budget no candidate meets, naming the smallest reachable value of each size budget."""
    if not space.budget.given():
        return ["budget: give at least one of bits_per_param, weight_bytes, kv_bytes_per_token, max_ppl"]
    if any(not space.budget.size_problems(size) for size in sizes.values()):
        return []
    problems = []
    for name in SIZE_BUDGETS:
        limit = getattr(space.budget, name)
        if limit is None:
            continue
        value = {"bits_per_param": lambda s: s.bits_per_param, "weight_bytes": lambda s: s.linear_bytes,
                 "kv_bytes_per_token": lambda s: s.kv_bytes_per_token}[name]
        smallest = min(sizes, key=lambda c: value(sizes[c]))
        problems.append(f"budget.{name}: {_number(limit)} is impossible in this space: the smallest reachable is "
                        f"{_number(value(sizes[smallest]))} ({smallest.key})")
    if len(problems) > 1 or not problems:
        problems.append("budget: no single candidate meets every size budget together")
    return problems


def parse_space(raw: Any) -> tuple[SearchSpace, ModelShape, dict[Candidate, SizeEstimate]]:
    """Validate a space (a dict) in full; returns it with the model's shape and every candidate's size estimate.
    Raises :class:`SpaceError` listing every problem; nothing is loaded."""
    if not isinstance(raw, dict):
        raise SpaceError([f"(top level): expected a mapping, got {type(raw).__name__}"])
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as exc:
        raise SpaceError(_format("", exc)) from None
    problems = [] if is_device_name(space.device) else [f"device: '{space.device}' is not a device ({DEVICE_NAMES})"]
    problems += _axis_problems(space)
    if not space.budget.given():
        problems.append("budget: give at least one of bits_per_param, weight_bytes, kv_bytes_per_token, max_ppl")
    if (reason := check_model_reference(space.model, space.revision)) is not None:
        problems.append(f"model: {reason}")
    if problems:
        raise SpaceError(problems)
    if (count := space.count()) > MAX_CANDIDATES:
        raise SpaceError([f"(axes): {count:,} candidates; a space may have at most {MAX_CANDIDATES:,}"])
    candidates = space.candidates()
    try:
        shape = model_shape(config_json(space.model, space.revision) or {})
    except ValueError as exc:
        raise SpaceError([f"model: {exc}"]) from None
    for candidate in candidates:
        try:
            parse_recipe(space.recipe_for(candidate))
        except RecipeError as exc:
            # a stage's problem is the candidate's; one of the header (device, text) is every candidate's: once
            problems.extend(f"candidate {candidate.key}: {problem}" if problem.startswith("stages[") else problem
                            for problem in exc.problems)
    if problems:
        raise SpaceError(list(dict.fromkeys(problems)))
    float_bytes = space.float_bytes()
    sizes = {candidate: estimate(shape, candidate, float_bytes) for candidate in candidates}
    if problems := budget_problems(space, sizes):
        raise SpaceError(problems)
    return space, shape, sizes


def load_space(path: str | Path) -> tuple[SearchSpace, ModelShape, dict[Candidate, SizeEstimate]]:
    """Read and validate a space file (YAML or JSON, read like a recipe: strict, size-capped, UTF-8)."""
    try:
        raw = read_recipe_file(Path(path), what="space")
    except RecipeError as exc:
        raise SpaceError(exc.problems) from None
    return parse_space(raw)
