"""Stage ``reload``: replace the in-memory model by one loaded back from an artifact.

Put it after ``export`` to prove, inside the recipe, that what was written is what was built:
an ``evaluate`` after ``reload`` must give the same perplexity as one before ``export``. The artifact is checked
against its manifest first (``verify: false`` skips the hashes, for speed).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from a3q.io.loading import load_graph
from a3q.io.model_folder import model_folder_problem
from a3q.registry import StageConfig, register_stage


class ReloadConfig(StageConfig):
    """``path``: the artifact to load; by default the one the nearest earlier exporting stage wrote."""

    path: str | None = Field(None, min_length=1, max_length=4096)
    verify: bool = True

    def check_in_recipe(self, earlier) -> list[str]:
        written = [Path(target).resolve() for spec in earlier if (target := spec.config.artifact_target())]
        if self.path is None:
            return [] if written else ["path: not given and no earlier 'export' stage to reload from"]
        try:
            resolved = Path(self.path).resolve()
            if resolved in written:
                return []

            if not resolved.is_dir():
                return [f"path: '{self.path}' does not exist and no earlier stage exports to it"]
            problem = model_folder_problem(resolved)
        except OSError as exc:
            return [f"path: '{self.path[:200]}': {exc.strerror or exc}"]
        return [f"path: {problem}"] if problem else []


def _latest_export(context) -> str:
    return next(spec.config.artifact_target() for spec in reversed(context.earlier) if spec.config.artifact_target())


@register_stage("reload", ReloadConfig)
def reload(graph, config: ReloadConfig, context):
    path = config.path if config.path is not None else _latest_export(context)
    device = next(graph.model.parameters()).device  # where the run's model is (the recipe's device, resolved)
    reloaded = load_graph(path, context.dtype, verify=config.verify, device=device,
                          offload=graph.layer_store.mode,  # an offloaded run reloads offloaded too
                          offload_near=context.output_dir)
    context.metrics.update(note=f"← {path}" + ("" if config.verify else " (not verified)"))
    return reloaded
