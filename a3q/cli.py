"""The ``a3q`` command line: run recipes, evaluate models, inspect artifacts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, help="Compose A³ low-rank compression with quantization, KV-cache compression and LoRA.")
console = Console()


def _fail(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    raise typer.Exit(code=2)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Failures that are the input's fault: shown as one line, never as a traceback."""
    from a3q.io.atomic import TargetBusyError, UnsafeTargetError
    from a3q.io.manifest import ArtifactError
    from a3q.numerics import NonFiniteError
    from a3q.recipe import RecipeError

    return (RecipeError, ArtifactError, NonFiniteError, TargetBusyError, UnsafeTargetError, OSError, ValueError)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML/JSON file"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for report.json (default: the recipe's output)"),
) -> None:
    """Validate RECIPE (before loading anything), run its stages, print the report table."""
    from a3q.engine import StageError, run_recipe
    from a3q.recipe import RecipeError, load_recipe

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        parsed = load_recipe(recipe)
    except RecipeError as exc:
        _fail(str(exc))
    try:
        result = run_recipe(parsed, out)
    except (StageError, RecipeError) as exc:  # report.json says failed, with the reason (and a traceback for bugs)
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; report.json says how far the run got")
    console.print(f"report: {result.output_dir / 'report.json'}")


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="model alias (smollm2-135m), HF folder or a3q artifact"),
    corpus: str = typer.Option("enwiki", help="corpus name"),
    split: str = typer.Option("test", help="corpus split: calib, test or all"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per window"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="evaluate at most this many windows"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="also write the result as JSON here"),
) -> None:
    """Perplexity of MODEL on a corpus split (non-overlapping windows, every token predicted)."""
    from a3q.assets.cache import write_json_atomic
    from a3q.calib.windows import sequential_windows
    from a3q.io.loading import load_graph
    from a3q.metrics.perplexity import perplexity

    try:
        graph = load_graph(model, dtype)
    except _user_errors() as exc:
        _fail(str(exc))
    windows = sequential_windows(graph.tokenizer, corpus, split, seq_len, max_windows)
    result = perplexity(graph.model, windows)
    payload = {
        "model": model,
        "corpus": corpus,
        "split": split,
        "seq_len": seq_len,
        "windows": result.windows,
        "predicted_tokens": result.predicted_tokens,
        "perplexity": result.perplexity,
        "params": graph.decoder_linear_params(),
        "kv_bytes_per_token": graph.kv_bytes_per_token(),
    }
    console.print(f"perplexity {result.perplexity:.4f} on {corpus}/{split} ({result.windows} × {seq_len} tokens)")
    if json_path:
        write_json_atomic(json_path, payload)


@app.command()
def verify(path: Path = typer.Argument(..., help="an a3q artifact folder")) -> None:
    """Check every file of an artifact against its manifest (size, then SHA-256); exit 2 naming the first bad one."""
    from a3q.io.manifest import ArtifactError, verify_artifact

    try:
        manifest = verify_artifact(path)
    except (ArtifactError, OSError) as exc:
        _fail(str(exc))
    console.print(f"ok: {len(manifest['files'])} files match the manifest of '{path}'")


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="an a3q artifact or HF model folder"),
    check: bool = typer.Option(False, "--verify", help="also check every file against the manifest"),
) -> None:
    """Structure (per-layer sizes), sizes and manifest of a saved model, without loading weights."""
    from transformers import AutoConfig

    import a3q.modeling.auto  # noqa: F401
    from a3q.arch import layers_from_config
    from a3q.io.manifest import ArtifactError, read_manifest
    from a3q.io.model_folder import model_folder_problem

    if not path.is_dir():
        _fail(f"'{path}' is not a folder")
    problem = model_folder_problem(path)
    if problem:
        _fail(problem)
    if check:
        verify(path)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except _user_errors() as exc:
        _fail(f"'{path}': {exc}")
    family, hidden, layers = layers_from_config(config)
    table = Table(title=f"{path} ({config.model_type}, family {family})")
    for column in ["layer", "heads / kv", "head dim", "q/k dim", "v/o dim", "intermediate", "rope pairs kept"]:
        table.add_column(column, justify="right")
    for index, layer in enumerate(layers):
        pairs = "all" if layer.rope_pairs is None else str(len(layer.rope_pairs[0]))
        table.add_row(
            str(index), f"{layer.num_heads}/{layer.num_kv_heads}", str(layer.head_dim),
            str(layer.qk_head_dim), str(layer.vo_head_dim), str(layer.intermediate_size), pairs,
        )
    console.print(table)
    params = sum(layer.linear_params(hidden) for layer in layers)
    console.print(f"decoder linear params: {params:,}")
    try:
        manifest = read_manifest(path)
    except ArtifactError as exc:
        _fail(str(exc))
    if manifest:
        console.print(f"a3q artifact (format {manifest['format']}, a3q {manifest['a3q_version']})")
        console.print_json(json.dumps({"recipe": manifest.get("recipe"), "report": manifest.get("report")}))


if __name__ == "__main__":
    app()
