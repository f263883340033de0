"""Stage ``reload``: replace the in-memory model by one loaded back from an artifact.

Put it after ``export`` to prove, inside the recipe, that what was written is what was built:
an ``evaluate`` after ``reload`` must give the same perplexity as one before ``export``.
"""

from __future__ import annotations

from a3q.io.loading import load_graph
from a3q.registry import StageConfig, register_stage


class ReloadConfig(StageConfig):
    """``path``: the artifact to load; by default the one the nearest earlier ``export`` wrote."""

    path: str | None = None

    def check_in_recipe(self, earlier) -> list[str]:
        if self.path is None and not any(spec.name == "export" for spec in earlier):
            return ["path: not given and no earlier 'export' stage to reload from"]
        return []


@register_stage("reload", ReloadConfig)
def reload(graph, config: ReloadConfig, context):
    path = config.path
    if path is None:
        path = next(spec.config.path for spec in reversed(context.recipe.stages[: context.spec.index]) if spec.name == "export")
    reloaded = load_graph(path, context.recipe.dtype)
    context.metrics.update(note=f"← {path}")
    return reloaded
