"""What the peer tools' side scripts share (``gptqmodel_side.py``, ``llmcompressor_side.py``).

They run in the peers' own venvs, which cannot import a3q (other transformers pins), so this file needs only the
standard library, torch and safetensors. Importing it makes the process offline before torch loads.
"""

from __future__ import annotations

import os

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def read_windows(path: str) -> torch.Tensor:
    """The token windows a3q's side of a benchmark wrote (``input_ids`` of shape [windows, seq_len])."""
    ids = load_file(path)["input_ids"].long()
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise SystemExit(f"{path}: input_ids must have shape [windows, seq_len >= 2], got {tuple(ids.shape)}")
    return ids
