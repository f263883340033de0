"""Every field of a checkpoint manifest, checked before a resumed run does any work.

The seal (:mod:`a3q.checkpoint.store`) catches an edited or truncated checkpoint; these checks catch one that is
sealed but inconsistent (resealed by hand, or written by a bug), so that a resume never continues from positions or
sizes the recipe and the model cannot have. Each failure is a :class:`~a3q.checkpoint.store.CheckpointError` of one
line naming the file and the field.

* :func:`check_fields`: each field is present and of its type (JSON alone);
* :func:`check_against`: positions and lists against the recipe (its stage groups) and the model (layers, sizes):

  - ``completed_groups`` below the recipe's number of stage groups (the last group is never checkpointed);
  - ``report_rows``: the load row plus one row per stage of the completed groups, in order; ``history`` ends with
    those stages; ``model_folder`` is the one of the last completed group that changed the model, ``model_dtype``
    one of a3q's dtypes;
  - ``pass``: the next group (a calibrating one), ``next_layer`` within the model's layers, a file per finished layer
    and one state file, named as a3q names them, the state's streams and stage states those of the group's stages,
    the per-layer sizes in its config (one per layer, within the original model's ``head_dim`` and
    ``intermediate_size``, even q/k dims where RoPE pairs are kept, RoPE pairs one sorted list per KV head);
  - ``files``: exactly the files the pass and the model folder hold;

* :func:`check_state_tensors`: every tensor the state names is in the state file (after the files' hashes).
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from a3q.checkpoint.store import MODEL_FOLDER, RESTART, CheckpointError, name_problem

if TYPE_CHECKING:
    from a3q.recipe import Recipe

_HEX = re.compile(r"[0-9a-f]{64}")
#: dtypes a3q loads models in (a3q.placement.DTYPES)
MODEL_DTYPES = ("float32", "bfloat16", "float16")
#: config lists a stage changes inside a pass (a3q.arch.surgery), restored from a pass checkpoint
LAYER_LISTS = ("qk_head_dims", "vo_head_dims", "intermediate_sizes", "rope_pairs")
#: report columns the engine and the report table read as numbers
_NUMERIC_COLUMNS = ("seconds", "peak_rss_mb", "params", "weight_bytes", "kv_bytes_per_token", "ppl",
                    "shared_pass_seconds")
_REQUIRED = ("a3q_version", "recipe", "model", "model_fingerprint", "files", "completed_groups", "report_rows",
             "history", "model_folder", "model_dtype", "pass", "position", "complete")
_PASS_FIELDS = ("group", "next_layer", "layers", "state_file", "windows_sha256", "dtype", "state", "config")


class _Refusal:
    """Builds the one-line error for a field of the manifest at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"'{self.path}': field '{field}' {problem}; {RESTART}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) or value is None


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# -- types (JSON alone) ------------------------------------------------------------------------------------------
def check_fields(manifest: dict[str, Any], path: Path) -> None:
    """Every field present and of its type; file names only those a3q writes."""
    refuse = _Refusal(path)
    for key in _REQUIRED:
        if key not in manifest:
            raise refuse(key, "is missing")
    for key, kind in (("a3q_version", str), ("recipe", dict), ("model", str), ("position", str), ("files", dict),
                      ("report_rows", list), ("complete", bool)):
        if not isinstance(manifest[key], kind):
            raise refuse(key, f"is {_show(manifest[key])}, not a {_kind(kind)}")
    if not isinstance(manifest["model_fingerprint"], str) or not _HEX.fullmatch(manifest["model_fingerprint"]):
        raise refuse("model_fingerprint", "is not a SHA-256")
    if not _is_int(manifest["completed_groups"]) or manifest["completed_groups"] < 0:
        raise refuse("completed_groups", f"is {_show(manifest['completed_groups'])}, not a count")
    for name, record in manifest["files"].items():
        problem = name_problem(name)
        if problem:
            raise refuse("files", problem)
        if not (isinstance(record, dict) and set(record) == {"bytes", "sha256"} and _is_int(record["bytes"])
                and record["bytes"] >= 0 and isinstance(record["sha256"], str) and _HEX.fullmatch(record["sha256"])):
            raise refuse(f"files.{name}", f"is {_show(record)}, not {{bytes, sha256}}")
    for position, row in enumerate(manifest["report_rows"]):
        where = f"report_rows[{position}]"
        if not isinstance(row, dict) or not isinstance(row.get("stage"), str):
            raise refuse(where, f"is {_show(row)}, not a report row (an object with a 'stage' name)")
        for column in _NUMERIC_COLUMNS:
            if column in row and not _is_number(row[column]):
                raise refuse(f"{where}.{column}", f"is {_show(row[column])}, not a number")
    history = manifest["history"]
    if history is not None:
        if not isinstance(history, list):
            raise refuse("history", f"is {_show(history)}, not a list")
        for position, entry in enumerate(history):
            if not (isinstance(entry, dict) and set(entry) == {"stage", "config"} and isinstance(entry["stage"], str)
                    and isinstance(entry["config"], dict)):
                raise refuse(f"history[{position}]", f"is {_show(entry)}, not {{stage, config}}")
    folder = manifest["model_folder"]
    if folder is not None and not (isinstance(folder, str) and MODEL_FOLDER.fullmatch(folder)):
        raise refuse("model_folder", f"is {_show(folder)}, not a model folder a3q writes")
    if manifest["model_dtype"] not in (None, *MODEL_DTYPES):
        raise refuse("model_dtype", f"is {_show(manifest['model_dtype'])}, not one of {', '.join(MODEL_DTYPES)}")
    if manifest["pass"] is not None:
        _check_pass_fields(manifest["pass"], refuse)


def _kind(kind: type) -> str:
    return {str: "string", dict: "JSON object", list: "list", bool: "true/false"}[kind]


def _check_pass_fields(saved: Any, refuse: _Refusal) -> None:
    if not isinstance(saved, dict):
        raise refuse("pass", f"is {_show(saved)}, not a JSON object")
    for key in _PASS_FIELDS:
        if key not in saved:
            raise refuse(f"pass.{key}", "is missing")
    for key in ("group", "next_layer"):
        if not _is_int(saved[key]) or saved[key] < 0:
            raise refuse(f"pass.{key}", f"is {_show(saved[key])}, not a position")
    for key, kind in (("layers", dict), ("config", dict), ("state", dict)):
        if not isinstance(saved[key], kind):
            raise refuse(f"pass.{key}", f"is {_show(saved[key])}, not a {_kind(kind)}")
    if not isinstance(saved["state_file"], str):
        raise refuse("pass.state_file", f"is {_show(saved['state_file'])}, not a file name")
    sha = saved["windows_sha256"]
    if sha is not None and not (isinstance(sha, str) and _HEX.fullmatch(sha)):
        raise refuse("pass.windows_sha256", "is not a SHA-256")
    if saved["dtype"] not in [f"torch.{name}" for name in MODEL_DTYPES]:
        raise refuse("pass.dtype", f"is {_show(saved['dtype'])}, not one of a3q's dtypes")
    for index, record in saved["layers"].items():
        if not (isinstance(record, dict) and set(record) == {"file", "modules"}
                and isinstance(record["modules"], dict)):
            raise refuse(f"pass.layers.{index}", f"is {_show(record)}, not {{file, modules}}")
    state = saved["state"]
    if set(state) != {"dict"} or not isinstance(state["dict"], dict) or set(state["dict"]) != {"hidden", "stages",
                                                                                               "rng"}:
        raise refuse("pass.state", "is not {hidden, stages, rng}")
    _check_split_state(state, "pass.state", refuse, 0)


def _check_split_state(value: Any, where: str, refuse: _Refusal, depth: int) -> None:
    """The layout :func:`a3q.checkpoint.state.split_tensors` writes: ``{"tensor": name}``, ``{"dict": {...}}``,
    lists and JSON scalars."""
    if depth > 64:
        raise refuse(where, "is nested deeper than checkpoint state is")
    if isinstance(value, dict):
        if set(value) == {"tensor"} and isinstance(value["tensor"], str):
            return
        if set(value) != {"dict"} or not isinstance(value["dict"], dict):
            raise refuse(where, f"is {_show(value)}, not checkpoint state ({{tensor}} or {{dict}})")
        for key, item in value["dict"].items():
            _check_split_state(item, f"{where}.{key}", refuse, depth + 1)
    elif isinstance(value, list):
        for position, item in enumerate(value):
            _check_split_state(item, f"{where}[{position}]", refuse, depth + 1)


# -- against the recipe and the model ---------------------------------------------------------------------------
@dataclass
class Expected:
    """What the recipe and the model allow a checkpoint to say."""

    #: per stage group: its stages as (name, changes_model)
    groups: list[list[tuple[str, bool]]]
    #: per stage group: (stream names, number of calibrating stages, whether a stage plans), None: no calibration
    passes: list[tuple[set[str], int, bool] | None]
    layers: int
    head_dim: int
    kv_heads: int
    intermediate_size: int
    linear_bound: int
    uses_rope: bool
    layer_count_key: str

    @classmethod
    def of(cls, recipe: Recipe, model_folder: Path) -> Expected:
        """From the recipe's stages (grouped as the engine groups them) and the model's config.json."""
        from transformers import AutoConfig

        import a3q.modeling.auto  # noqa: F401  (a3q's config classes, for a model that is an a3q artifact)
        from a3q.arch import adapter
        from a3q.passes import StageContext, plan_groups
        from a3q.registry import get_stage

        workers = [get_stage(spec.name).build(spec.config, StageContext(recipe, spec)) for spec in recipe.stages]
        spec_of = {id(worker): spec for worker, spec in zip(workers, recipe.stages)}
        groups, passes = [], []
        for group in plan_groups(workers):
            groups.append([(spec_of[id(w)].name, type(spec_of[id(w)].config).changes_model) for w in group])
            active = [worker for worker in group if worker.calibrates()]
            planners = [worker for worker in active if worker.needs_plan()]
            streams = {f"stage{position}" for position, worker in enumerate(active)
                       if worker.statistics == "dense" and worker not in planners}
            streams |= {"sequential"} if any(worker.statistics == "sequential" for worker in active) else set()
            passes.append((streams, len(active), bool(planners)) if active else None)
        try:
            config = AutoConfig.from_pretrained(str(model_folder))
            family = adapter(config)
            structures = family.layer_structures(config)
        except Exception as exc:  # noqa: BLE001  (any failure to read the config: the load would fail the same way)
            raise CheckpointError(f"--resume: cannot read the model's config '{model_folder / 'config.json'}' to "
                                  f"check the checkpoint against it ({exc})") from None
        dense_ff = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                    or 4 * family.hidden_size(config))
        first = structures[0]
        ff = max([dense_ff, *(s.intermediate_size for s in structures)])
        # the widest linear a decoder layer can hold, fused ones included (q/k/v: (h + 2 h_kv)·d; gate/up: 2·ff)
        fused = (first.num_heads + 2 * first.num_kv_heads) * first.head_dim
        return cls(groups=groups, passes=passes, layers=len(structures), head_dim=first.head_dim,
                   kv_heads=first.num_kv_heads, intermediate_size=ff, uses_rope=family.uses_rope,
                   linear_bound=max(family.hidden_size(config), 2 * ff, fused),
                   layer_count_key="n_layer" if "n_layer" in config.to_dict() else "num_hidden_layers")


def check_against(manifest: dict[str, Any], expected: Expected, path: Path) -> None:
    """Positions and lists against the recipe and the model (after :func:`check_fields`)."""
    refuse = _Refusal(path)
    groups, done = expected.groups, manifest["completed_groups"]
    if done >= len(groups):
        raise refuse("completed_groups", f"is {done}: the recipe has {len(groups)} stage group(s), and a checkpoint "
                                         f"is written after at most {len(groups) - 1}")
    stages = [name for group in groups[:done] for name, _ in group]
    rows = [row["stage"] for row in manifest["report_rows"]]
    if rows != (["load", *stages] if done else []):
        raise refuse("report_rows", f"name the stages {_show(rows)}; after {done} completed group(s) of this recipe "
                                    f"they are {_show(['load', *stages] if done else [])}")
    history = manifest["history"]
    if done and (history is None or [entry["stage"] for entry in history[len(history) - len(stages):]] != stages
                 or len(history) < len(stages)):
        raise refuse("history", f"does not end with the completed stages {_show(stages)}")
    if not done and history is not None:
        raise refuse("history", "is set, but no stage group completed")
    changed = [index for index, group in enumerate(groups[:done]) if any(changes for _, changes in group)]
    folder = f"model-{changed[-1]:02d}" if changed else None
    if manifest["model_folder"] != folder:
        raise refuse("model_folder", f"is {_show(manifest['model_folder'])}; after {done} completed group(s) of this "
                                     f"recipe it is {_show(folder)}")
    if (manifest["model_dtype"] is None) != (folder is None):
        raise refuse("model_dtype", f"is {_show(manifest['model_dtype'])} with model folder {_show(folder)}")
    referenced = set()
    saved = manifest["pass"]
    if saved is not None:
        referenced = _check_pass(saved, expected, done, refuse)
    listed = set(manifest["files"])
    model_files = {name for name in listed if name.split("/")[0] == folder}
    for name in sorted(listed - referenced - model_files):
        raise refuse("files", f"lists '{name}', which neither the pass nor the model folder holds")
    for name in sorted(referenced - listed):
        raise refuse("files", f"does not list '{name}', which the pass holds")
    if folder is not None and not model_files:
        raise refuse("files", f"lists no file of the model folder '{folder}'")


def _check_pass(saved: dict[str, Any], expected: Expected, done: int, refuse: _Refusal) -> set[str]:
    """The pass in progress; returns the files it holds."""
    group = saved["group"]
    if group != done:
        raise refuse("pass.group", f"is {group}; the pass in progress is the next group's, {done}")
    calibration = expected.passes[group]
    if calibration is None:
        raise refuse("pass.group", f"is {group}, a stage group without a layer-by-layer pass")
    streams, stage_count, plans = calibration
    next_layer, layers = saved["next_layer"], expected.layers
    if next_layer > layers or (next_layer == 0 and not plans):
        raise refuse("pass.next_layer", f"is {next_layer}; the model has {layers} layers (1..{layers} after a "
                                        "layer" + (", 0 after planning" if plans else "") + ")")
    if set(saved["layers"]) != {str(index) for index in range(next_layer)}:
        raise refuse("pass.layers", f"name layers {_show(sorted(saved['layers']))}, not 0..{next_layer - 1}")
    files = set()
    for index, record in saved["layers"].items():
        name = f"pass-{group:02d}/layer-{int(index):05d}.safetensors"
        if record["file"] != name:
            raise refuse(f"pass.layers.{index}.file", f"is {_show(record['file'])}, not {name!r}")
        _check_modules(record["modules"], f"pass.layers.{index}.modules", expected, refuse)
        files.add(name)
    state_file = f"pass-{group:02d}/state-{next_layer:05d}.safetensors"
    if saved["state_file"] != state_file:
        raise refuse("pass.state_file", f"is {_show(saved['state_file'])}, not {state_file!r}")
    state = saved["state"]["dict"]
    hidden = state["hidden"].get("dict") if isinstance(state["hidden"], dict) else None
    if not isinstance(hidden, dict) or set(hidden) != streams:
        raise refuse("pass.state.hidden", f"holds the streams {_show(sorted(hidden or []))}; this pass's stages use "
                                          f"{_show(sorted(streams))}")
    for name, batches in hidden.items():
        if not isinstance(batches, list) or not batches or not all(
                isinstance(batch, dict) and set(batch) == {"tensor"} for batch in batches):
            raise refuse(f"pass.state.hidden.{name}", "is not a list of tensors")
    stage_states = state["stages"]
    if not isinstance(stage_states, list) or len(stage_states) != stage_count or not all(
            isinstance(item, dict) and set(item) == {"dict"} for item in stage_states):
        raise refuse("pass.state.stages", f"is not the states of the pass's {stage_count} calibrating stage(s)")
    rng = state["rng"].get("dict") if isinstance(state["rng"], dict) else None
    if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= set(rng) <= {"python", "numpy", "torch",
                                                                                      "cuda"}:
        raise refuse("pass.state.rng", "is not the random generators' states")
    check_layer_config(saved["config"], expected, "pass.config", refuse)
    return files | {state_file}


def _check_modules(modules: dict[str, Any], where: str, expected: Expected, refuse: _Refusal) -> None:
    """Swapped modules: a class of :data:`a3q.checkpoint.layers.REBUILDERS` with its constructor's arguments."""
    from a3q.checkpoint.layers import REBUILDERS

    for path, spec in modules.items():
        if not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", path) or not isinstance(spec, dict) or set(spec) != {"class",
                                                                                                         "args"}:
            raise refuse(f"{where}.{path}", f"is {_show(spec)}, not a swapped module {{class, args}}")
        if not isinstance(spec["class"], str) or spec["class"] not in REBUILDERS:
            raise refuse(f"{where}.{path}.class", f"is {_show(spec['class'])}, not one of {sorted(REBUILDERS)}")
        args = spec["args"]
        parameters = set(inspect.signature(REBUILDERS[spec["class"]][0]).parameters) - {"dtype", "device"}
        if not isinstance(args, dict) or not set(args) <= parameters:
            raise refuse(f"{where}.{path}.args", f"is {_show(args)}, not arguments of {spec['class']}")
        for key, value in args.items():
            if isinstance(value, bool) and key == "bias":
                continue
            if not _is_int(value) or not -1 <= value <= expected.linear_bound or key == "bias":
                raise refuse(f"{where}.{path}.args.{key}", f"is {_show(value)}, not a size of this model's linears")


def check_layer_config(config: dict[str, Any], expected: Expected, where: str, refuse: _Refusal) -> None:
    """A model config's layer count and per-layer sizes against the original model."""
    layers = expected.layers
    count = config.get(expected.layer_count_key)
    if count != layers:
        raise refuse(f"{where}.{expected.layer_count_key}", f"is {_show(count)}, the model has {layers} layers")
    lists = {}
    for name in LAYER_LISTS:
        value = config.get(name)
        if value is not None and (not isinstance(value, list) or len(value) != layers):
            raise refuse(f"{where}.{name}", f"is {_show(value)}, not one entry per layer ({layers})")
        lists[name] = value
    d, h_kv = expected.head_dim, expected.kv_heads
    bounds = {"qk_head_dims": d, "vo_head_dims": d, "intermediate_sizes": expected.intermediate_size}
    for name, bound in bounds.items():
        for index, value in enumerate(lists[name] or []):
            if not _is_int(value) or not 1 <= value <= bound:
                raise refuse(f"{where}.{name}[{index}]", f"is {_show(value)}, not a size in [1, {bound}] (the "
                                                         "original model's)")
    pairs = lists["rope_pairs"]
    if pairs is not None and not expected.uses_rope:
        raise refuse(f"{where}.rope_pairs", "is set for a model without RoPE")
    for index in range(layers if expected.uses_rope else 0):
        qk = (lists["qk_head_dims"] or [d] * layers)[index]
        kept = pairs[index] if pairs is not None else None
        field = f"{where}.rope_pairs[{index}]"
        if kept is None:
            if qk != d:
                raise refuse(f"{where}.qk_head_dims[{index}]", f"is {qk} < head_dim {d} without rope_pairs[{index}]")
            continue
        if qk % 2:
            raise refuse(f"{where}.qk_head_dims[{index}]", f"is {qk}, not even (RoPE pairs are kept)")
        if not isinstance(kept, list) or len(kept) != h_kv:
            raise refuse(field, f"is {_show(kept)}, not one list per KV head ({h_kv})")
        for head in kept:
            if not (isinstance(head, list) and len(head) == qk // 2
                    and all(_is_int(p) and 0 <= p < d // 2 for p in head)
                    and head == sorted(set(head))):
                raise refuse(field, f"holds {_show(head)}, not {qk // 2} sorted distinct pair indices in [0, {d // 2})")
    factorized = config.get("a3q_factorized")
    if factorized is not None and not (isinstance(factorized, dict) and all(
            isinstance(path, str) and _is_int(rank) and 1 <= rank <= expected.linear_bound
            for path, rank in factorized.items())):
        raise refuse(f"{where}.a3q_factorized", f"is {_show(factorized)}, not linear paths with ranks")


def check_model_config(folder: Path, expected: Expected) -> None:
    """The checkpointed model's config.json (a file of the sealed folder) against the original model."""
    try:
        config = json.loads((folder / "config.json").read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"'{folder / 'config.json'}' cannot be read ({exc}); {RESTART}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"'{folder / 'config.json'}' is not a JSON object; {RESTART}")
    check_layer_config(config, expected, "config", _Refusal(folder / "config.json"))


def check_state_tensors(manifest: dict[str, Any], root: Path) -> None:
    """Every tensor the pass's state names is in its state file (read after the file's hash was checked)."""
    from safetensors import safe_open

    saved = manifest["pass"]
    if saved is None:
        return
    path = root / saved["state_file"]
    try:
        with safe_open(str(path), framework="pt") as handle:
            held = set(handle.keys())
    except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types for a damaged header)
        raise CheckpointError(f"checkpoint file '{path}' is not a safetensors file ({exc}); {RESTART}") from None
    missing = sorted(_tensor_names(saved["state"]) - held)
    if missing:
        raise _Refusal(root / "checkpoint.json")("pass.state", f"names tensor {missing[0]!r}, which '{path}' does not "
                                                               "hold")


def _tensor_names(state: Any) -> set[str]:
    """The tensors a state (as :func:`_check_split_state` accepted it) names."""
    names, pending = set(), [state]
    while pending:
        value = pending.pop()
        if isinstance(value, dict) and set(value) == {"tensor"}:
            names.add(value["tensor"])
        elif isinstance(value, dict):
            pending.extend(value["dict"].values())
        elif isinstance(value, list):
            pending.extend(value)
    return names
