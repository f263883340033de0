"""Where the model runs and in what precision: a recipe's ``device`` and ``dtype`` resolved to torch objects.

``device: auto`` is the first GPU when CUDA is available, else the CPU. ``dtype: auto`` is the checkpoint's own
dtype (``torch_dtype``/``dtype`` in config.json) on a GPU, and float32 on a CPU, where bfloat16/float16 matmuls are
slow (and a3q's CPU numbers are pinned in float32).
"""

from __future__ import annotations

import re
from typing import Any

import torch

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: names checkpoints use in config.json for their dtype, beyond the three above
_CONFIG_DTYPES = {**DTYPES, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                  "half": torch.float16, "float": torch.float32}
_DEVICE = re.compile(r"^(auto|cpu|cuda(?::(\d{1,3}))?)$")


def is_device_name(name: str) -> bool:
    """Whether ``name`` is spelled as a device (auto, cpu, cuda, cuda:N), whatever this machine has."""
    return isinstance(name, str) and _DEVICE.fullmatch(name) is not None


def device_problem(name: str) -> str | None:
    """Why ``name`` is not a device this machine has (for recipe validation), or None."""
    match = _DEVICE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        return f"'{name}' is not a device name (use {DEVICE_NAMES})"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            return f"'{name}' asks for a GPU, but CUDA is not available on this machine (use device: cpu or auto)"
        index = int(match.group(2) or 0)
        count = torch.cuda.device_count()
        if index >= count:
            return f"'{name}': this machine has {count} GPU(s) (cuda:0 … cuda:{count - 1})"
    return None


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → the first GPU when CUDA is available, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as given.

    Raises ValueError for a name that is not a device or a GPU this machine does not have.
    """
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    problem = device_problem(name)
    if problem:
        raise ValueError(problem)
    return torch.device("cuda:0") if name == "cuda" else torch.device(name)


def checkpoint_dtype(config: dict[str, Any] | None) -> torch.dtype | None:
    """The dtype a checkpoint's config.json declares (``dtype`` or the older ``torch_dtype``), or None."""
    config = config or {}
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if isinstance(value, str):
            found = _CONFIG_DTYPES.get(value.removeprefix("torch."))
            if found is not None:
                return found
    text = config.get("text_config")  # multimodal-style configs nest the language model's settings
    return checkpoint_dtype(text) if isinstance(text, dict) and text is not config else None


def resolve_dtype(name: str | torch.dtype, config: dict[str, Any] | None = None,
                  device: torch.device | str | None = None) -> torch.dtype:
    """``float32``/``bfloat16``/``float16`` as given; ``auto`` → the checkpoint's dtype on a GPU, float32 on a CPU.

    ``auto`` on a GPU falls back to float32 when config.json declares no (known) dtype.
    """
    if isinstance(name, torch.dtype):
        return name
    if name in DTYPES:
        return DTYPES[name]
    if name != "auto":
        raise ValueError(f"'{name}' is not a dtype (use auto, {', '.join(DTYPES)})")
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    if device.type == "cpu":
        return torch.float32
    return checkpoint_dtype(config) or torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``'bfloat16'`` (for reports)."""
    return str(dtype).removeprefix("torch.")
