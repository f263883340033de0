"""The distillation teacher: which model it is, what it says about the training windows, and its on-disk cache.

The teacher runs **once**, before training, over the windows this process will train on, and only its top-k
distribution per prediction is kept (:func:`a3q.stages.lora.distill.teacher_targets`): indices (int32), log
probabilities and the tail's log mass (float32), ``windows × (seq_len − 1) × (8k + 4)`` bytes (with
``distill_layers``, also those layers' outputs in float32: ``4·d`` bytes per layer and position). Then the teacher
is freed, so training holds one model, not two.

The targets are written as safetensors (no pickle) into the run's output folder, atomically (a temporary sibling,
then a rename), under a name that is a hash of everything they depend on: the teacher (its reference, revision,
and its weight files' names, sizes and modification times), the dtype it ran in, the temperature, ``k``, and the
exact token ids of the windows. A resumed or repeated run with the same settings finds the file and skips the
teacher; any change gives another name, so a stale cache is never read. A file that does not load, or whose
recorded key or shapes differ, is recomputed.

Data-parallel: each rank computes and caches only the windows of the pool it trains on (its shares of the steps,
:func:`a3q.stages.lora.data_parallel.rank_share`), in its own file: the cache is sharded like the windows.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from a3q.assets.models import resolve_model_path
from a3q.atomic import write_safetensors_atomic
from a3q.io.loading import load_graph
from a3q.stages.lora.distill import TeacherTargets, teacher_targets
from a3q.stages.lora.hidden import captured_layers, stacked

#: the cache's format; a change makes every old file a miss
CACHE_VERSION = 1
#: logits kept at once while the teacher runs (bytes): sets how many windows go through it per forward
LOGITS_BUDGET = 1 << 28


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher to load: a model reference (the recipe's own for ``teacher: input``) at a revision, in a dtype."""

    reference: str
    revision: str | None
    dtype: str

    def identity(self) -> dict:
        """What names this teacher's weights for the cache key: the reference, revision, dtype and its weight files'
        names, sizes and modification times (a model rewritten in place gets a new key)."""
        try:
            folder = resolve_model_path(self.reference, self.revision)
            files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).glob("*.safetensors"))
        except (OSError, RuntimeError, ValueError):
            files = []
        return {"reference": self.reference, "revision": self.revision, "dtype": self.dtype, "files": files}


def cache_key(spec: TeacherSpec, windows: torch.Tensor, top_k: int, temperature: float,
              layers: list[int] | None = None) -> str:
    """The hex digest that names a cache file (module docstring)."""
    digest = hashlib.sha256()
    head = {"version": CACHE_VERSION, "teacher": spec.identity(), "top_k": top_k, "temperature": temperature,
            "windows": list(windows.shape), **({"layers": list(layers)} if layers else {})}
    digest.update(json.dumps(head, sort_keys=True).encode())
    digest.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class TeacherCache:
    """The targets of ``windows`` (the rows of the pool this process trains on, in ``rows``), and how they came:
    computed (``seconds`` of teacher time) or read back from ``path``."""

    rows: torch.Tensor
    targets: TeacherTargets
    path: Path | None
    reused: bool
    seconds: float

    def for_rows(self, pool_rows: torch.Tensor) -> TeacherTargets:
        """The targets of the pool's rows ``pool_rows`` (each one of :attr:`rows`)."""
        where = torch.searchsorted(self.rows, pool_rows)
        if bool((where >= len(self.rows)).any()) or not torch.equal(self.rows[where.clamp(max=len(self.rows) - 1)],
                                                                      pool_rows):
            raise KeyError(f"the teacher cache has no targets for windows {pool_rows.tolist()}")
        t = self.targets
        return TeacherTargets(t.indices[where], t.logprobs[where], t.tail[where],
                              None if t.hidden is None else t.hidden[where])

    @property
    def bytes(self) -> int:
        t = self.targets
        return sum(x.numel() * x.element_size() for x in (t.indices, t.logprobs, t.tail, t.hidden) if x is not None)


def teacher_cache(spec: TeacherSpec, pool: torch.Tensor, rows: torch.Tensor, top_k: int, temperature: float,
                  folder: Path, name: str, device: torch.device, layers: list[int] | None = None) -> TeacherCache:
    """The teacher's targets for ``pool[rows]``: read from ``folder`` when a file with this key is there, else
    computed (the teacher loaded, run, freed) and written. ``name`` prefixes the file (the stage and rank).
    ``layers``: also keep the teacher's outputs of these decoder layers (``distill_layers``)."""
    rows = rows.sort().values
    windows = pool[rows]
    key = cache_key(spec, windows, top_k, temperature, layers)
    path = folder / f"{name}-{key[:24]}.safetensors"
    cached = _read(path, key, windows.shape, top_k, len(layers or []))
    if cached is not None:
        return TeacherCache(rows, cached, path, reused=True, seconds=0.0)
    started = time.perf_counter()
    targets = run_teacher(spec, windows, top_k, temperature, device, layers)
    seconds = time.perf_counter() - started
    _write(path, key, targets, spec, top_k, temperature)
    return TeacherCache(rows, targets, path, reused=False, seconds=seconds)


def run_teacher(spec: TeacherSpec, windows: torch.Tensor, top_k: int, temperature: float,
                device: torch.device, layers: list[int] | None = None) -> TeacherTargets:
    """Load the teacher, take its top-k targets over ``windows`` ``[N, P]`` (predictions ``0 … P−2``) and the
    outputs of decoder ``layers``, free it."""
    graph = load_graph(spec.reference, spec.dtype, device=device, revision=spec.revision)
    try:
        model = graph.model
        vocab = int(model.config.get_text_config().vocab_size)
        n, length = windows.shape
        batch = max(1, LOGITS_BUDGET // (length * vocab * 4))
        indices = torch.empty(n, length - 1, top_k, dtype=torch.int32)
        logprobs = torch.empty(n, length - 1, top_k, dtype=torch.float32)
        tail = torch.empty(n, length - 1, dtype=torch.float32)
        hidden = torch.empty(n, len(layers), length - 1, graph.hidden_size, dtype=torch.float32) if layers else None
        with torch.no_grad(), captured_layers(model, graph.family, layers) as captured:
            for start in range(0, n, batch):
                ids = windows[start : start + batch].to(device)
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
                found = teacher_targets(logits, top_k, temperature)
                end = start + len(ids)
                indices[start:end] = found.indices.to("cpu", torch.int32)
                logprobs[start:end] = found.logprobs.to("cpu", torch.float32)
                tail[start:end] = found.tail.to("cpu", torch.float32)
                if hidden is not None:
                    hidden[start:end] = stacked(captured, layers).to("cpu", torch.float32)
                del logits, found
    finally:
        del graph  # the teacher is not kept: training holds the student alone
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return TeacherTargets(indices, logprobs, tail, hidden)


def _read(path: Path, key: str, shape: torch.Size, top_k: int, layers: int = 0) -> TeacherTargets | None:
    """The targets in ``path`` if it holds exactly this key's (else None: it is recomputed and replaced)."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError, ValueError):
        return None
    n, length = int(shape[0]), int(shape[1])
    expected = {"indices": (n, length - 1, top_k), "logprobs": (n, length - 1, top_k), "tail": (n, length - 1)}
    if layers:
        expected["hidden"] = (n, layers, length - 1, tensors["hidden"].shape[-1]) if "hidden" in tensors else ()
    if metadata.get("key") != key or set(tensors) != set(expected) or any(
            tuple(tensors[name].shape) != size for name, size in expected.items()):
        return None
    return TeacherTargets(tensors["indices"], tensors["logprobs"], tensors["tail"], tensors.get("hidden"))


def _write(path: Path, key: str, targets: TeacherTargets, spec: TeacherSpec, top_k: int, temperature: float) -> None:
    """Write the targets to ``path`` atomically (a resumed run reads a whole file or none)."""
    metadata = {"key": key, "format": f"a3q-lora-teacher-{CACHE_VERSION}", "teacher": spec.reference,
                "top_k": str(top_k), "temperature": repr(temperature)}
    tensors = {"indices": targets.indices, "logprobs": targets.logprobs, "tail": targets.tail}
    if targets.hidden is not None:
        tensors["hidden"] = targets.hidden
    write_safetensors_atomic(path, tensors, metadata)
