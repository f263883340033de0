"""Load a model reference (alias, HF folder, or a3q artifact) into a ModelGraph, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from a3q.arch import describe
from a3q.assets.models import resolve_model_path

MANIFEST_NAME = "a3q.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_manifest(path: Path | str) -> dict | None:
    """The a3q manifest of an artifact folder, or None for a plain Hugging Face folder."""
    manifest = Path(path) / MANIFEST_NAME
    return json.loads(manifest.read_text()) if manifest.is_file() else None


def load_graph(reference: str | Path, dtype: str = "float32"):
    """Load ``reference`` into a :class:`~a3q.graph.ModelGraph` without touching any hub.

    a3q's own model classes are registered with transformers first, so artifacts written by
    a3q load in-process without ``trust_remote_code``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import a3q.modeling  # noqa: F401  (registers a3q model classes with the Auto classes)

    path = resolve_model_path(str(reference))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype])
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    manifest = read_manifest(path)
    history = manifest.get("structure", {}).get("history", []) if manifest else []
    graph = describe(model, tokenizer, source=str(reference), history=history)
    if manifest:
        graph.kv_cache_bits = manifest.get("structure", {}).get("kv_cache_bits")
    return graph
