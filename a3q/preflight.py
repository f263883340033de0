"""Memory preflight: estimate a run's peak memory from files and the recipe, before anything loads.

The estimate reads config.json and the safetensors headers (tensor shapes and dtypes, never tensor data) and the
recipe's fields. Its components, in bytes (a rough upper bound of the peak, not a sum of everything ever allocated):

* ``runtime``: the Python process with torch and transformers imported (measured: about 380 MiB);
* ``weights``: every tensor of the checkpoint in the run's dtype (integer tensors, GPTQ codes, as stored);
* ``weights_file_pages``: when the run's dtype differs from the stored one, the file's pages are read while the
  converted copy is built (both are resident at the load's peak); zero when the dtypes match (transformers then
  keeps the memory-mapped file's tensors);
* ``calibration_activations``: a calibration pass keeps one layer's inputs and outputs for every window:
  ``2 × windows × seq_len × hidden × bytes``;
* ``layer_statistics``: one layer's float64 second moments (GPTQ Hessians, a baseline's ``E[x xᵀ]``; A³'s head-space
  statistics are smaller) and the matrices GPTQ inverts them with: :func:`layer_statistics_bytes`;
* what each stage declares (:meth:`~a3q.registry.StageConfig.memory_estimate`), each component's largest over the
  stages: ``forward_workspace`` for every stage (its batch through one layer: activations, attention scores and,
  when it measures quality, the logits and one window's float64 log-softmax), ``lora_training`` for ``lora`` (the
  adapter's weights, gradients, Adam state and the activations kept for the backward pass);
* ``text``: the calibration windows (kept for the run), the largest evaluation's windows and the buffers that read
  and tokenize one record (:func:`a3q.checks.text_bytes`): text is streamed, so this never grows with a file's size.

On a CPU everything is host memory. On a GPU the model, activations, statistics and workspace are device memory;
the host holds the runtime and, while loading, the checkpoint's pages. :func:`check_memory` compares the estimate with
what is available (``psutil``, else ``/proc/meminfo``; ``torch.cuda.mem_get_info`` on a GPU) and refuses a run that
does not fit, naming the recipe fields that would make it fit. :func:`preflight` is the engine's door: it returns
the run's :class:`~a3q.pipeline.plan.RunPlan` (device, dtype, offload, processes, estimate, and the problems that
refuse the run).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from a3q import distributed
from a3q.assets.models import HubModelError, resolve_model_path
from a3q.checks import text_bytes
from a3q.io.model_folder import read_header
from a3q.io.shards import weight_files
from a3q.pipeline.plan import ModelShape, RunPlan
from a3q.placement import dtype_name, resolve_device, resolve_dtype
from a3q.recipe import RecipeError, offload_problems

#: the Python process with torch + transformers + a3q imported, measured on Linux (CPython 3.11, torch 2.13)
RUNTIME_BYTES = 380 << 20
#: the estimate may use at most this fraction of what is available (the OS, the page cache, fragmentation)
HEADROOM = 0.9
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8}
_FLOAT_TYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_GIB = 1 << 30


def _gib(count: int | float) -> str:
    return f"{count / _GIB:.2f} GiB"


def _tensor_entries(folder: Path):
    """``(name, safetensors dtype, element count)`` of every tensor in the checkpoint's weight files (headers only)."""
    for file in weight_files(folder):
        for name, entry in read_header(file).items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            numel = 1
            for size in entry.get("shape", []):
                numel *= int(size)
            yield name, entry.get("dtype", "F32"), numel


def checkpoint_tensors(folder: Path) -> dict[str, int]:
    """Element counts by safetensors dtype (``{"F32": n, "I32": m}``) over the checkpoint's weight files."""
    counts: dict[str, int] = {}
    for _, kind, numel in _tensor_entries(folder):
        counts[kind] = counts.get(kind, 0) + numel
    return counts


def _config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    text = config.get("text_config") if isinstance(config, dict) else None
    return {**config, **text} if isinstance(text, dict) else (config if isinstance(config, dict) else {})


def _int(config: dict[str, Any], *keys: str, default: int = 0) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def layer_bytes(folder: Path, width: int) -> tuple[int, int, int]:
    """``(outside, largest_layer, largest_layer_file)``: bytes of the tensors outside the decoder layers and of the
    largest decoder layer in the run's float width (integer tensors as stored), and that layer's bytes on disk."""
    outside, layers, files = 0, {}, {}
    for name, kind, numel in _tensor_entries(folder):
        stored = numel * _DTYPE_BYTES.get(kind, 4)
        working = numel * (width if kind in _FLOAT_TYPES else _DTYPE_BYTES.get(kind, 4))
        match = _LAYER_NAME.search(name)
        if match is None:
            outside += working
        else:
            layers[match.group(1)] = layers.get(match.group(1), 0) + working
            files[match.group(1)] = files.get(match.group(1), 0) + stored
    largest = max(layers, key=layers.get) if layers else None
    return outside, layers.get(largest, 0), files.get(largest, 0)


_LAYER_NAME = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def layer_statistics_bytes(hidden: int, intermediate: int) -> int:
    """Peak bytes of one layer's float64 statistics: every input's second moments while the layer is observed
    (``3·hidden² + intermediate²``: q/k/v, o, gate/up, down) plus the two ``n × n`` matrices GPTQ's inversion adds
    to the group it quantizes; the largest such moment is down_proj's alone (``3·intermediate²``)."""
    observed = 3 * hidden * hidden + intermediate * intermediate
    return 8 * max(observed + 2 * hidden * hidden, 3 * intermediate * intermediate)


def estimate_memory(recipe: Any, folder: Path | None = None, offload: str | None = None, text: int = 0) -> dict[str, Any]:
    """Estimate the run's peak memory: ``{"device", "dtype", "offload", "host": {component: bytes},
    "device_memory": {...}, "host_total", "device_total"}`` (device entries only on a GPU). Reads config.json and
    safetensors headers. ``offload`` (default: the recipe's, ``auto`` counting as ``none``): with ``cpu``/``disk``
    the weights are the non-layer tensors plus the largest layer twice (the layer held and, while a stage rebuilds
    it, its replacement) and that layer's file pages; ``cpu`` keeps the changed layers in host memory."""
    folder = Path(folder) if folder is not None else resolve_model_path(recipe.model, getattr(recipe, "revision", None))
    config = _config(folder)
    device = resolve_device(distributed.rank_device(getattr(recipe, "device", "cpu")))
    dtype = resolve_dtype(recipe.dtype, config, device)
    width = torch.empty((), dtype=dtype).element_size()
    hidden = _int(config, "hidden_size", "n_embd", "d_model")
    shape = ModelShape(hidden=hidden, intermediate=_int(config, "intermediate_size", "n_inner", default=4 * hidden),
                       heads=_int(config, "num_attention_heads", "n_head", default=1),
                       layers=_int(config, "num_hidden_layers", "n_layer", default=1), vocab=_int(config, "vocab_size"),
                       width=width)

    counts = checkpoint_tensors(folder)
    weights = weights_in_dtype = sum(n * (width if kind in _FLOAT_TYPES else _DTYPE_BYTES.get(kind, 4))
                                     for kind, n in counts.items())
    stored_float = {kind for kind in counts if kind in _FLOAT_TYPES}
    same_dtype = stored_float <= {_safetensors_name(dtype)}
    file_bytes = sum(n * _DTYPE_BYTES.get(kind, 4) for kind, n in counts.items())

    calibrating = [spec for spec in recipe.stages if spec.config.needs_calibration]
    cal = recipe.calibration
    activations = 2 * cal.windows * cal.seq_len * hidden * width if calibrating else 0
    statistics = layer_statistics_bytes(hidden, shape.intermediate) if calibrating else 0
    stage_needs: dict[str, int] = {"forward_workspace": 0, "lora_training": 0}  # the components the report always has
    for spec in recipe.stages:
        for component, need in spec.config.memory_estimate(shape, cal.seq_len).items():
            stage_needs[component] = max(stage_needs.get(component, 0), need)

    mode = offload or getattr(recipe, "offload", "none")
    mode = "none" if mode == "auto" else mode
    file_pages = 0 if same_dtype else file_bytes
    store = 0
    if mode in ("cpu", "disk"):
        outside, largest, largest_file = layer_bytes(folder, width)
        weights, file_pages = outside + 2 * largest, largest_file
        store = weights_in_dtype if mode == "cpu" else 0  # the changed layers, at most the whole model
    model_side = {"weights": weights, "calibration_activations": activations, "layer_statistics": statistics,
                  **stage_needs}
    estimate: dict[str, Any] = {"device": str(device), "dtype": dtype_name(dtype), "offload": mode}
    if device.type == "cpu":
        host = {"runtime": RUNTIME_BYTES, **model_side, "weights_file_pages": file_pages, "offload_store": store,
                "text": text}
        estimate["host"] = host
    else:
        pages = file_bytes if mode == "none" else file_pages
        estimate["host"] = {"runtime": RUNTIME_BYTES, "weights_file_pages": pages, "offload_store": store, "text": text}
        estimate["device_memory"] = model_side
        estimate["device_total"] = sum(model_side.values())
    estimate["host_total"] = sum(estimate["host"].values())
    return estimate


def _safetensors_name(dtype: torch.dtype) -> str:
    return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}.get(dtype, "")


def available_host_memory() -> int | None:
    """Bytes the system can give this process now (psutil's ``available``, else MemAvailable), or None."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 (psutil missing or unusable: fall back to /proc)
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (``torch.cuda.mem_get_info``), or None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    except Exception:  # noqa: BLE001
        return None


def _advice(recipe: Any, estimate: dict[str, Any], parts: dict[str, int]) -> list[str]:
    """Recipe fields that would shrink the largest components."""
    advice = []
    if estimate["dtype"] == "float32":
        advice.append("dtype: bfloat16 (halves weights and activations)")
    if parts.get("calibration_activations"):
        cal = recipe.calibration
        advice.append(f"fewer calibration.windows (now {cal.windows}; activations take "
                      f"{_gib(parts['calibration_activations'])}) or a shorter calibration.seq_len (now {cal.seq_len})")
    if parts.get("forward_workspace") or parts.get("lora_training"):
        advice.append(", ".join(["a smaller batch_size on the evaluating/calibrating stages",
                                 *(hint for spec in recipe.stages for hint in spec.config.memory_advice())]))
    if estimate["device"] == "cpu" and torch.cuda.is_available():
        advice.append("device: cuda")
    if estimate.get("offload") == "none":
        advice.append("offload: disk (decoder layers loaded one at a time)")
    return advice


def check_memory(recipe: Any, folder: Path | None = None, estimate: dict[str, Any] | None = None,
                 processes: int = 1) -> dict[str, Any]:
    """Estimate the run's memory and refuse it (:class:`~a3q.recipe.RecipeError`) when it cannot fit.

    ``processes``: how many copies of the run this machine holds at once (a data-parallel run's processes on this
    host): each loads the model and keeps its own activations and statistics, so host memory is needed that many
    times; on GPUs every process has a device of its own. Returns the estimate (for the report), with
    ``available_host`` / ``available_device`` in bytes when known.
    """
    estimate = estimate or estimate_memory(recipe, folder)
    problems = []
    host = available_host_memory()
    estimate["available_host"] = host
    if host is not None and processes * estimate["host_total"] > HEADROOM * host:
        problems.append(_refusal("host memory", estimate["host_total"], host, estimate["host"], recipe, estimate,
                                 processes))
    if "device_memory" in estimate:
        free = available_device_memory(torch.device(estimate["device"]))
        estimate["available_device"] = free
        if free is not None and estimate["device_total"] > HEADROOM * free:
            problems.append(_refusal(f"memory on {estimate['device']}", estimate["device_total"], free,
                                     estimate["device_memory"], recipe, estimate))
    if problems:
        raise RecipeError(problems)
    return estimate


def _refusal(what: str, needed: int, available: int, parts: dict[str, int], recipe: Any,
             estimate: dict[str, Any], processes: int = 1) -> str:
    largest = sorted(((value, key) for key, value in parts.items() if value), reverse=True)[:3]
    breakdown = ", ".join(f"{key} {_gib(value)}" for value, key in largest)
    if processes > 1:
        fit = int(HEADROOM * available // needed) if needed else processes
        return (f"memory: {processes} processes need about {_gib(processes * needed)} of {what} ({_gib(needed)} each: "
                f"{breakdown}; dtype {estimate['dtype']}) but {_gib(available)} is available: "
                + (f"at most {fit} process(es) fit (--nproc {fit})" if fit >= 1 else "not even one process fits"))
    return (f"memory: the run needs about {_gib(needed)} of {what} ({breakdown}; dtype {estimate['dtype']}) but "
            f"{_gib(available)} is available; to fit, try: " + "; ".join(_advice(recipe, estimate, parts)))


def local_processes() -> int:
    """Processes of this run on this machine: torchrun's ``LOCAL_WORLD_SIZE`` (1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def preflight(recipe: Any, processes: int | None = None) -> RunPlan:
    """The engine's check before loading: the run's :class:`~a3q.pipeline.plan.RunPlan`, whose ``problems`` say why
    the run cannot fit (one per memory; empty when it fits).

    ``offload: auto`` becomes ``cpu`` or ``disk`` only when the whole model does not fit. An estimate that cannot be
    made (an unreadable header: loading will say why) refuses nothing; the plan then carries the error.
    ``processes``: copies of the run on this machine (default: :func:`local_processes`); a GPU run needs a GPU each.
    """
    requested = getattr(recipe, "offload", "none")
    processes = local_processes() if processes is None else processes
    device = str(resolve_device(distributed.rank_device(recipe.device)))

    def plan(estimate: dict[str, Any], offload: str, problems: list[str] | None = None) -> RunPlan:
        return RunPlan(device=estimate.get("device", device), dtype=estimate.get("dtype", recipe.dtype),
                       offload=offload, processes=processes, estimate=estimate, problems=problems or [])

    unchanged = "none" if requested == "auto" else requested
    try:
        text = text_bytes(recipe)  # the windows and reading buffers, bounded by the windows (not by file sizes)
        estimate = estimate_memory(recipe, text=text)
    except HubModelError as exc:
        return plan({"error": f"model: {exc}"}, unchanged, [f"model: {exc}"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return plan({"error": f"{type(exc).__name__}: {exc}"}, unchanged)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else None
    if estimate["device"] != "cpu" and processes > 1 and gpus is not None and processes > gpus:
        return plan(estimate, unchanged, [f"device: {processes} processes need a GPU each, and this machine has "
                                          f"{gpus} (--nproc {gpus}, or device: cpu)"])
    try:
        check_memory(recipe, estimate=estimate, processes=processes)
        return plan(estimate, unchanged)
    except RecipeError as exc:
        problems = list(exc.problems)
    if requested != "auto":
        return plan(estimate, unchanged, problems)
    # offload: auto: the model does not fit whole; try host memory for a GPU run's layers, then the disk
    for mode in (("cpu", "disk") if estimate["device"] != "cpu" else ("disk",)):
        blocked = offload_problems(recipe.stages, mode)
        if blocked:
            return plan(estimate, unchanged, problems + [f"offload: auto would offload the layers, but {blocked[0]}"])
        offloaded = estimate_memory(recipe, offload=mode, text=text)
        try:
            check_memory(recipe, estimate=offloaded, processes=processes)
        except RecipeError:
            continue
        return plan(offloaded, mode)
    return plan(estimate, unchanged, problems)
