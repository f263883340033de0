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
    factored = _factored_ranks(path)
    if factored:
        model = _load_factored(path, factored, DTYPES[dtype])
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype])
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    manifest = read_manifest(path)
    history = manifest.get("structure", {}).get("history", []) if manifest else []
    graph = describe(model, tokenizer, source=str(reference), history=history)
    if manifest:
        structure = manifest.get("structure", {})
        graph.kv_cache_bits = structure.get("kv_cache_bits")
        # the quantized-cache setting is also in generation_config.json; the manifest is the record that counts
        if structure.get("kv_cache") or graph.kv_cache is not None:
            graph.set_kv_cache(structure.get("kv_cache"))
    return graph


def _factored_ranks(path: Path) -> dict[str, int]:
    """``config.a3q_factorized`` (module path → factor rank) of a low-rank baseline artifact, else empty."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return {}
    return json.loads(config_file.read_text()).get("a3q_factorized") or {}


def _load_factored(path: Path, factored: dict[str, int], dtype: torch.dtype):
    """Build the model from its config, swap in the two-factor modules, then load the weights strictly.

    Why not ``from_pretrained``: it builds dense linears and would drop the factor weights as unexpected keys.
    Only the keys of tied weights (the LM head under tied embeddings) may be absent from the files.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from a3q.stages.baselines.common import rebuild_factored_modules

    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    rebuild_factored_modules(model, factored)
    state: dict[str, torch.Tensor] = {}
    for weights in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(weights)))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if getattr(config, "tie_word_embeddings", False) else set()
    buffers = {name for name, _ in model.named_buffers()}
    missing = [key for key in missing if key not in tied and key not in buffers]
    if missing or unexpected:
        raise RuntimeError(f"factored artifact {path}: missing={sorted(missing)} unexpected={sorted(unexpected)}")
    model.tie_weights()
    return model
