"""A checkpoint manifest against the recipe and the model, checked before a resumed run does any work.

The seal (:mod:`a3q.checkpoint.store`) catches an edited or truncated checkpoint and :mod:`a3q.checkpoint.fields`
one whose fields have the wrong types; these checks catch one that is sealed but inconsistent (resealed by hand, or written by a bug), so that a resume never continues from positions or
sizes the recipe and the model cannot have. Each failure is a :class:`~a3q.checkpoint.store.CheckpointError` of one
line naming the file and the field.

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

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import a3q.arch.auto  # noqa: F401  (registers a3q's config classes, for a model that is an a3q artifact)
from a3q.arch import adapter
from a3q.checkpoint.fields import LAYER_LISTS, RESTART, CheckpointError, _is_int, _Refusal, _show
from a3q.module_types import REBUILDABLE, rebuildable
from a3q.pipeline.groups import plan_groups
from a3q.registry import build_stages

if TYPE_CHECKING:
    from a3q.recipe import Recipe

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

        workers = build_stages(recipe)
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
    """Swapped modules: a rebuildable module type (:mod:`a3q.module_types`) with its constructor's arguments."""
    for path, spec in modules.items():
        if not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", path) or not isinstance(spec, dict) or set(spec) != {"class",
                                                                                                         "args"}:
            raise refuse(f"{where}.{path}", f"is {_show(spec)}, not a swapped module {{class, args}}")
        entry = rebuildable(spec["class"]) if isinstance(spec["class"], str) else None
        if entry is None:
            raise refuse(f"{where}.{path}.class", f"is {_show(spec['class'])}, not one of {sorted(REBUILDABLE)}")
        args = spec["args"]
        parameters = entry.constructor_parameters()
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
