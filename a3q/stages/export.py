"""Stage ``export``: write the current model as an a3q artifact (see :mod:`a3q.io.artifact`)."""

from __future__ import annotations

from pathlib import Path

from a3q.io.artifact import ArtifactExistsError, check_target, save_artifact
from a3q.registry import StageConfig, register_stage


class ExportConfig(StageConfig):
    """``path``: the artifact folder (relative paths resolve against the working directory)."""

    path: str

    def check_in_recipe(self, earlier) -> list[str]:
        try:
            check_target(Path(self.path))
        except ArtifactExistsError as exc:
            return [f"path: {exc}"]
        return []


@register_stage("export", ExportConfig)
def export(graph, config: ExportConfig, context):
    path = save_artifact(graph, config.path, recipe=context.recipe.raw, report=context.report.rows)
    context.metrics.update(path=str(path), note=f"→ {path}")
    return graph
