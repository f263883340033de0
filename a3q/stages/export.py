"""Stage ``export``: write the current model as an a3q artifact (see :mod:`a3q.io.artifact`)."""

from __future__ import annotations

from pydantic import Field, field_validator

from a3q import distributed
from a3q.io.artifact import ArtifactExistsError, check_target, save_artifact
from a3q.io.manifest import read_manifest
from a3q.io.shards import DEFAULT_MAX_SHARD_SIZE, parse_shard_size
from a3q.registry import StageConfig, register_stage


class ExportConfig(StageConfig):
    """``path``: the artifact folder (relative paths resolve against the working directory, once, before the check
    and the write, so ``..`` cannot make them differ). ``max_shard_size``: weights larger than this are written as
    several safetensors shards plus ``model.safetensors.index.json``, written like transformers' ``"500MB"``,
    ``"2GB"`` (powers of 1000) or an int of bytes; the default is ``save_pretrained``'s, ``"50GB"``."""

    changes_model = False

    path: str = Field(min_length=1, max_length=4096)
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE

    @field_validator("max_shard_size")
    @classmethod
    def _parses(cls, value: int | str) -> int | str:
        parse_shard_size(value)  # ValueError → a validation problem naming the field
        return value

    def artifact_target(self) -> str | None:
        return self.path

    def check_in_recipe(self, earlier) -> list[str]:
        try:
            check_target(self.path)
        except ArtifactExistsError as exc:
            return [f"path: {exc}"]
        except OSError as exc:
            return [f"path: '{self.path[:200]}': {exc.strerror or exc}"]
        return []


@register_stage("export", ExportConfig)
def export(graph, config: ExportConfig, context):
    """Write the artifact. In a data-parallel run only rank 0 writes (every rank holds the same model); the others
    wait on a barrier until it is written, so a later ``reload`` finds it on every rank."""
    if distributed.is_main():
        path = save_artifact(graph, config.path, recipe=context.recipe_raw, report=context.report_rows,
                             max_shard_size=config.max_shard_size)
    distributed.barrier()
    if not distributed.is_main():
        from pathlib import Path

        path = Path(config.path).resolve()
    weights = (read_manifest(path) or {}).get("weights", {})
    shards = weights.get("shards")
    context.metrics.update(path=str(path), shards=shards, max_shard_size=parse_shard_size(config.max_shard_size),
                           note=f"→ {path}" + (f" ({shards} shards)" if shards and shards > 1 else ""))
    return graph
