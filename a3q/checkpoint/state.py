"""Nested checkpoint state (JSON values and tensors) split into JSON plus a flat tensor dict, and back; RNG states.

Checkpoints never pickle: a stage's state is plain JSON (numbers, strings, lists, dicts with string keys) with
tensors anywhere inside. :func:`split_tensors` replaces each tensor by ``{"tensor": key}`` and collects it under that
key for a safetensors file; :func:`join_tensors` puts them back. Python floats survive JSON exactly (``repr`` is the
shortest round-tripping form), so a resumed run computes from the very same numbers.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor


def split_tensors(value: Any, tensors: dict[str, Tensor], key: str = "state", seen: dict[int, str] | None = None) -> Any:
    """``value`` with every tensor replaced by ``{"tensor": name}``; the tensors are added to ``tensors``.

    A tensor that appears twice (two streams holding the same inputs) is stored once; tensors that merely share
    memory (views) are copied, since a safetensors file holds each byte once.
    """
    seen = {} if seen is None else seen
    if isinstance(value, Tensor):
        if id(value) in seen:
            return {"tensor": seen[id(value)]}
        storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
        tensor = value.detach().contiguous()
        if tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()
        tensors[key], seen[id(value)] = tensor, key
        return {"tensor": key}
    if isinstance(value, dict):
        if not all(isinstance(name, str) for name in value):
            raise TypeError(f"{key}: checkpoint state needs string keys, got {sorted(map(repr, value))[:3]}")
        return {"dict": {name: split_tensors(item, tensors, f"{key}.{name}", seen) for name, item in value.items()}}
    if isinstance(value, (list, tuple)):
        return [split_tensors(item, tensors, f"{key}.{position}", seen) for position, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{key}: a {type(value).__name__} cannot go into a checkpoint (JSON values and tensors only)")


def join_tensors(value: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of :func:`split_tensors`."""
    if isinstance(value, dict) and "tensor" in value:
        return tensors[value["tensor"]]
    if isinstance(value, dict):
        return {name: join_tensors(item, tensors) for name, item in value["dict"].items()}
    if isinstance(value, list):
        return [join_tensors(item, tensors) for item in value]
    return value


def map_tensors(value: Any, function: Any) -> Any:
    """``value`` with ``function`` applied to every tensor in it (dicts and lists are rebuilt)."""
    if isinstance(value, Tensor):
        return function(value)
    if isinstance(value, dict):
        return {name: map_tensors(item, function) for name, item in value.items()}
    if isinstance(value, list):
        return [map_tensors(item, function) for item in value]
    return value


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's (CPU and CUDA) generator states, as checkpoint state."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)), position, has_gauss,
                  cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
