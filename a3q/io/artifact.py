"""a3q artifacts: safetensors weights + config + tokenizer + ``a3q.json`` manifest.

The folder is written into a temporary sibling and renamed into place when complete. Models
with a3q's own classes are saved with their modeling file and an ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` works without a3q.
The manifest records the recipe, the report so far, the model structure and a SHA-256 of
every file, so an artifact says exactly what produced it.

Weights bigger than ``max_shard_size`` are written as transformers' standard shards
(``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``; see :mod:`a3q.io.shards`), by
``save_pretrained`` one shard at a time from views of the model's tensors (no second copy of the model in memory), or,
for an offloaded model, one layer at a time (the layer store's ``write_weights``: :mod:`a3q.layer_store.streaming`);
the manifest lists and hashes each shard and the index like any other file, reading them back in 1 MiB blocks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from a3q import __version__
from a3q.arch.auto import add_remote_code, is_a3_model
from a3q.atomic import UnsafeTargetError, atomic_directory, write_json_atomic
from a3q.graph import ModelGraph
from a3q.io.adapter import adapter_set_aside
from a3q.io.kv_cache_code import write_remote_cache_code
from a3q.io.manifest import FORMAT_VERSION, MANIFEST_NAME, file_records, replace_refusal, seal
from a3q.io.shards import DEFAULT_MAX_SHARD_SIZE, WEIGHTS_INDEX, parse_shard_size, weight_files


class ArtifactExistsError(UnsafeTargetError, FileExistsError):
    """The target exists and is not an a3q artifact, so it is not ours to replace."""


def check_target(path: Path | str) -> Path:
    """The resolved target of an export; refuse a non-empty folder that is not an a3q artifact.

    Resolving first matters: ``out/missing/../v`` is ``out/v``, and the check must look at the folder the write
    would replace. The same test runs again under the write lock, just before the swap.
    """
    resolved = Path(path).resolve()
    if resolved.exists() or resolved.is_symlink():
        reason = replace_refusal(resolved)
        if reason:
            raise ArtifactExistsError(reason)
    return resolved


def _adapter_set_aside(graph: ModelGraph, staging: Path, path: Path):
    """Context for saving the base model: LoRA layers set aside inside, the adapter written on exit (if any)."""
    return adapter_set_aside(graph, staging, path)


def _model_bytes(graph: ModelGraph) -> int:
    tensors = list(graph.model.parameters()) + list(graph.model.buffers())
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def save_artifact(
    graph: ModelGraph, path: str | Path, recipe: dict[str, Any] | None, report: list[dict],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``graph`` as an artifact at ``path`` (atomically, under a lock) and return the resolved path.

    ``max_shard_size`` (``"500MB"``, ``"2GB"`` or an int of bytes; transformers' units): weights larger than it are
    written as several ``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``. The
    manifest's ``weights`` entry records the files and the limit.
    """
    shard_bytes = parse_shard_size(max_shard_size)
    path = check_target(path)

    def may_replace(target: Path) -> str | None:
        return replace_refusal(target)

    with atomic_directory(path, may_replace=may_replace, expected_bytes=_model_bytes(graph)) as staging:
        with _adapter_set_aside(graph, staging, path):  # base weights without LoRA layers; the adapter goes to adapter/
            write_model(graph, staging, shard_bytes)
        save_tokenizer(graph.tokenizer, staging)
        if graph.kv_cache is not None:  # quantized cache: generate() uses it without a3q too

            write_remote_cache_code(graph.model, staging)
        write_json_atomic(
            staging / MANIFEST_NAME,
            seal(
                {
                    "format": FORMAT_VERSION,
                    "a3q_version": __version__,
                    "recipe": recipe,
                    "report": report,
                    "structure": graph.structure(),
                    "weights": weights_record(staging, shard_bytes),
                    "files": file_records(staging),
                }
            ),
        )
    return path


def weights_record(folder: Path, max_shard_size: int | None = None) -> dict[str, Any]:
    """``{"files": [...], "shards": n, "index": name or None, "max_shard_size": bytes}`` for the weights in
    ``folder`` (the adapter, in ``adapter/``, is not counted: it is always one file)."""
    files = [f.name for f in weight_files(folder)]
    index = WEIGHTS_INDEX if (folder / WEIGHTS_INDEX).is_file() and len(files) > 1 else None
    return {"files": files, "shards": len(files), "index": index, "max_shard_size": max_shard_size}


def write_model(graph: ModelGraph, folder: Path, max_shard_size: int) -> None:
    """The model's config and weights in ``folder``, as its layer store writes them (``save_pretrained``, or shard
    by shard from an offloaded model), plus, for a3q's own classes, the modeling files and an ``auto_map`` naming
    them; a model of a transformers class is written without an ``auto_map`` inherited from its input."""
    def save() -> None:
        graph.layer_store.write_weights(graph, folder, max_shard_size)

    if is_a3_model(graph.model):
        add_remote_code(graph.model, folder, save=save)
    else:
        with without_input_auto_map(graph.model.config):
            save()


@contextmanager
def without_input_auto_map(config: Any) -> Iterator[None]:
    """``config.auto_map`` set aside while a model of a transformers class is saved.

    An input folder may name remote code in ``auto_map``; a3q loaded it with transformers' own class and does not
    ship that code, so keeping the entry would point a ``trust_remote_code`` loader at files that are not there (or
    that someone adds later).
    """
    auto_map = getattr(config, "auto_map", None)
    if auto_map is not None:
        del config.auto_map
    try:
        yield
    finally:
        if auto_map is not None:
            config.auto_map = auto_map


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """``tokenizer.save_pretrained(folder)`` without the input's ``auto_map``: a3q loads tokenizers with
    transformers' own classes and ships no tokenizer code, so an ``auto_map`` copied from the input's
    ``tokenizer_config.json`` would make ``AutoTokenizer.from_pretrained(artifact, trust_remote_code=True)`` (and
    lm_eval's command line, which passes it) look for code that is not there."""
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if isinstance(config, dict) and "auto_map" in config:
            del config["auto_map"]
            write_json_atomic(config_path, config)
