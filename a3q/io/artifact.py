"""a3q artifacts: safetensors weights + config + tokenizer + ``a3q.json`` manifest.

The folder is written into a temporary sibling and renamed into place when complete. Models
with a3q's own classes are saved with their modeling file and an ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` works without a3q.
The manifest records the recipe, the report so far, the model structure and a SHA-256 of
every file, so an artifact says exactly what produced it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from a3q import __version__
from a3q.assets.cache import atomic_directory, write_json_atomic
from a3q.graph import ModelGraph
from a3q.io.loading import MANIFEST_NAME, read_manifest

FORMAT_VERSION = 1


class ArtifactExistsError(FileExistsError):
    """The target folder exists and is not an a3q artifact, so it is not ours to replace."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_target(path: Path) -> None:
    """Refuse to replace a non-empty folder that a3q did not write."""
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and read_manifest(path) is None)):
        raise ArtifactExistsError(f"'{path}' exists and is not an a3q artifact; refusing to overwrite it")


def _adapter_set_aside(graph: ModelGraph, staging: Path, path: Path):
    """Context for saving the base model: LoRA layers set aside inside, the adapter written on exit (if any)."""
    from a3q.stages.lora.adapter import adapter_set_aside

    return adapter_set_aside(graph, staging, path)


def save_artifact(graph: ModelGraph, path: str | Path, recipe: dict[str, Any] | None, report: list[dict]) -> Path:
    """Write ``graph`` as an artifact at ``path`` (atomically) and return the path."""
    from a3q.modeling import is_a3_model, save_with_remote_code

    path = Path(path)
    check_target(path)
    with atomic_directory(path) as staging:
        with _adapter_set_aside(graph, staging, path):  # base weights without LoRA layers; the adapter goes to adapter/
            if is_a3_model(graph.model):
                save_with_remote_code(graph.model, staging)
            else:
                graph.model.save_pretrained(staging)
        graph.tokenizer.save_pretrained(staging)
        if graph.kv_cache is not None:  # quantized cache: generate() uses it without a3q too
            from a3q.cache.remote import write_remote_cache_code

            write_remote_cache_code(graph.model, staging)
        files = {f.relative_to(staging).as_posix(): _sha256(f) for f in sorted(staging.rglob("*")) if f.is_file()}
        write_json_atomic(
            staging / MANIFEST_NAME,
            {
                "format": FORMAT_VERSION,
                "a3q_version": __version__,
                "recipe": recipe,
                "report": report,
                "structure": graph.structure(),
                "files": files,
            },
        )
    return path
