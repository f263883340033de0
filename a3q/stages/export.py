"""Stage ``export``: write the current model as an a3q artifact (see :mod:`a3q.io.artifact`)."""

from __future__ import annotations

from pydantic import Field

from a3q.io.artifact import ArtifactExistsError, check_target, save_artifact
from a3q.registry import StageConfig, register_stage


class ExportConfig(StageConfig):
    """``path``: the artifact folder (relative paths resolve against the working directory, once, before the check
    and the write, so ``..`` cannot make them differ)."""

    path: str = Field(min_length=1, max_length=4096)

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
    path = save_artifact(graph, config.path, recipe=context.recipe.raw, report=context.report.rows)
    context.metrics.update(path=str(path), note=f"→ {path}")
    return graph
