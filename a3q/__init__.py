"""a3q: compose A³ analytical low-rank compression with quantization, KV-cache compression and LoRA.

Entry points: :func:`load` (an artifact or model folder → ModelGraph), :func:`run`
(a recipe file → RunResult), and the ``a3q`` command line.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path: str, dtype: str = "float32", verify: bool = True):
    """Load an a3q artifact (or any supported model folder / alias) as a ModelGraph.

    An artifact's files are checked against its manifest first (``verify=False`` skips that).
    """
    from a3q.io.loading import load_graph

    return load_graph(path, dtype, verify=verify)


def run(recipe_path: str, output_dir: str | None = None):
    """Validate and run a recipe file; returns the engine's RunResult."""
    from a3q.engine import run_recipe
    from a3q.recipe import load_recipe

    return run_recipe(load_recipe(recipe_path), output_dir)
