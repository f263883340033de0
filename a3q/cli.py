"""The ``a3q`` command line: run recipes, evaluate models, inspect and serve artifacts."""

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
#: the module every process of ``a3q run --nproc N`` runs (``python -m``); a wrapper of this command line names
#: itself here so that its ranks run it too (the tests' stop points: tests/stop_at.py)
RANK_MODULE = "a3q.cli"


def _fail(message: str) -> None:
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):  # a rank of a distributed run: say which one
        message = f"rank {os.environ.get('RANK', '?')}: {message}"
    Console(stderr=True).print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Failures that are the input's fault: shown as one line, never as a traceback."""
    from a3q.atomic import TargetBusyError, UnsafeTargetError
    from a3q.io.manifest import ArtifactError
    from a3q.numerics import NonFiniteError
    from a3q.recipe import RecipeError

    return (RecipeError, ArtifactError, NonFiniteError, TargetBusyError, UnsafeTargetError, OSError, ValueError)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML/JSON file"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for report.json (default: the recipe's output)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the checkpoint in OUT/checkpoint (with any "
                                "--nproc: a checkpoint does not depend on the number of processes)"),
    restart: bool = typer.Option(False, "--restart", help="discard OUT/checkpoint and start over"),
    keep_checkpoint: bool = typer.Option(False, "--keep-checkpoint", help="keep OUT/checkpoint after success"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="data-parallel calibration in N processes on this machine "
                              "(torch.distributed.run; gloo on CPU, nccl on GPUs); 1: one plain process"),
) -> None:
    """Validate RECIPE (before loading anything), run its stages, print the report table.

    The run checkpoints into OUT/checkpoint (recipe fields checkpoint_every / checkpoint_minutes); SIGINT or SIGTERM
    stop it after the current layer with a checkpoint, and --resume continues it. With --nproc N ≥ 2 (or under
    torchrun) the calibration is data-parallel; rank 0 writes the checkpoints and every rank resumes from them
    (docs/distributed.md).
    """
    from a3q.checkpoint.run import CheckpointRefused
    from a3q.checkpoint.stops import RunStopped
    from a3q.checkpoint.store import CheckpointError
    from a3q.distributed import DistributedError
    from a3q.engine import StageError, run_recipe
    from a3q.io.run_lock import OutputBusyError, OutputFolderError
    from a3q.recipe import RecipeError, load_recipe

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if resume and restart:
        _fail("--resume and --restart exclude each other")
    try:
        parsed = load_recipe(recipe)
    except RecipeError as exc:
        _fail(str(exc))
    if nproc > 1:
        _launch(recipe, out, parsed, nproc, resume, restart, keep_checkpoint)
        return
    try:
        result = run_recipe(parsed, out, resume=resume, restart=restart, keep_checkpoint=keep_checkpoint)
    except (StageError, RecipeError, CheckpointRefused, CheckpointError) as exc:  # report.json says why
        _fail(str(exc))
    except (OutputBusyError, OutputFolderError, DistributedError) as exc:  # the folder or the launch, before any work
        _fail(str(exc))
    except RunStopped as exc:
        where = out if out is not None else parsed.output or "out/run"
        world = os.environ.get("WORLD_SIZE", "1")
        processes = f" --nproc {world}" if world not in ("", "1") else ""
        hint = f"; resume with: a3q run {recipe} --out {where}{processes} --resume" if exc.resumable else ""
        if os.environ.get("RANK", "0") == "0":  # a distributed run: rank 0 speaks for every rank
            Console(stderr=True).print(f"[bold yellow]stopped:[/] {exc}{hint}", markup=True, highlight=False)
        raise typer.Exit(code=exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; report.json says how far the run got")
    if result.report.context.get("world_size", 1) == 1 or os.environ.get("RANK", "0") == "0":
        console.print(f"report: {result.output_dir / 'report.json'}")


def _launch(recipe: Path, out: Optional[Path], parsed, nproc: int, resume: bool, restart: bool,
            keep_checkpoint: bool) -> None:
    """``a3q run RECIPE --nproc N``: the same command in N processes through torch.distributed.run (torchrun).

    Nothing starts before the launch is known to fit: the output folder is locked here (for the ranks, which are told
    so), and everything a run checks before loading is checked once for N processes, memory included."""
    from a3q import distributed
    from a3q.engine import launch_problems
    from a3q.io.run_lock import HELD_ENV, OutputBusyError, OutputFolderError, RunLock, prepare_output_folder
    from a3q.recipe import RecipeError

    try:
        distributed.collective_timeout()  # a malformed A3Q_COLLECTIVE_TIMEOUT_S fails here, not in N processes
        where = prepare_output_folder(Path(out if out is not None else parsed.output or "out/run"))
        lock = RunLock(where).acquire()
    except (distributed.DistributedError, OutputBusyError, OutputFolderError) as exc:
        _fail(str(exc))
    try:
        problems = launch_problems(parsed, where, nproc, resume)
    except RecipeError as exc:
        problems = exc.problems
    if problems:
        lock.release()
        _fail(f"--nproc {nproc}: " + "; ".join(problems))
    args = [RANK_MODULE, "run", str(recipe), "--out", str(where)]
    args += ["--resume"] * resume + ["--restart"] * restart + ["--keep-checkpoint"] * keep_checkpoint
    os.environ[HELD_ENV] = str(where)
    try:
        distributed.launch(nproc, args)
    except Exception as exc:  # torchrun's ChildFailedError names the ranks that failed
        ranks = distributed.failed_ranks(exc)
        codes = {failure.exitcode for failure in getattr(exc, "failures", {}).values()}
        stop_codes = {code for code in codes if code in (130, 143)}
        if stop_codes and _report_status(where / "report.json") == "stopped":  # rank 0 said how to resume
            raise typer.Exit(code=min(stop_codes))
        _note_failure(where / "report.json", f"distributed run failed: {ranks}")
        Console(stderr=True).print(f"[bold red]error:[/] distributed run ({nproc} processes) failed: {ranks}; "
                                   "the failing ranks' errors are printed above", markup=True, highlight=False)
        raise typer.Exit(code=2 if codes == {2} else 1)
    finally:
        os.environ.pop(HELD_ENV, None)
        lock.release()


def _report_status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _note_failure(path: Path, message: str) -> None:
    """Mark report.json failed after the launcher saw ranks fail (rank 0 may have been stopped before it could)."""
    from a3q.atomic import write_json_atomic

    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if payload.get("status") != "failed":
        payload["status"] = "failed"
        payload["failed"] = message
    else:
        payload["failed"] = f"{payload.get('failed')} ({message})"
    write_json_atomic(path, payload)


@app.command()
def search(
    space: Path = typer.Argument(..., help="search space YAML/JSON file (docs/search.md)"),
    out: Path = typer.Option(..., "--out", help="folder for the front, best.yaml and every built candidate"),
    resume: bool = typer.Option(False, "--resume", help="continue a stopped search in OUT: finished candidates are "
                                "kept, a half-built one resumes from its checkpoint"),
) -> None:
    """Find the best composition for a budget: validate SPACE (before loading anything), rank every candidate by
    proxy, build and measure the best-ranked, write OUT/front.json|csv|png and OUT/best.yaml."""
    from a3q.checkpoint.stops import RunStopped
    from a3q.engine import StageError
    from a3q.io.run_lock import OutputBusyError, OutputFolderError
    from a3q.recipe import RecipeError
    from a3q.search.driver import run_search
    from a3q.search.state import SearchRefused

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        result = run_search(space, out, resume=resume, console=console)
    except (RecipeError, SearchRefused, StageError, OutputBusyError, OutputFolderError) as exc:
        _fail(str(exc))
    except RunStopped as exc:
        Console(stderr=True).print(f"[bold yellow]stopped:[/] {exc}; resume with: a3q search {space} --out {out} "
                                   "--resume", markup=True, highlight=False)
        raise typer.Exit(code=exc.exit_code)
    console.print(f"front: {result.out / 'front.json'}" + (f"; best: {result.out / 'best.yaml'}" if result.best else
                                                           "; no point within the budget"))


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="model alias (smollm2-135m), HF folder or a3q artifact"),
    corpus: Optional[str] = typer.Option(None, help="bundled corpus name (default enwiki)"),
    split: Optional[str] = typer.Option(None, help="corpus split: calib, test (default) or all"),
    path: Optional[str] = typer.Option(None, "--path", help="your own text instead of the corpus: a .txt, .jsonl, "
                                       ".json or .parquet file, or a folder of them"),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="records' text field with --path (default "
                                             "text; records with chat 'messages' use the chat template)"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per window"),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="evaluate at most this many windows"),
    dtype: str = typer.Option("auto", help="auto (the checkpoint's on a GPU, float32 on a CPU), float32, bfloat16 or float16"),
    device: str = typer.Option("auto", help="auto (the first GPU, else the CPU), cpu, cuda or cuda:N"),
    offload: str = typer.Option("none", help="none, or cpu: keep the decoder layers in the files and score "
                                "layer by layer (for a model bigger than memory; see docs/offload.md)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="also write the result as JSON here"),
) -> None:
    """Perplexity of MODEL on a corpus split or your own text (non-overlapping windows, every token predicted)."""
    from pydantic import ValidationError

    from a3q.atomic import write_json_atomic
    from a3q.calib.sources import TextSource
    from a3q.calib.windows import sequential_windows
    from a3q.io.loading import load_graph, load_tokenizer
    from a3q.metrics.perplexity import perplexity

    fields = {"corpus": corpus, "split": split, "path": path, "text_field": text_field}
    if path is None and split is None:
        fields["split"] = "test"
    try:
        source = TextSource.model_validate({name: value for name, value in fields.items() if value is not None})
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'source'}: {e['msg'].removeprefix('Value error, ')}"
                        for e in exc.errors()))
    if offload not in ("none", "cpu"):
        _fail(f"--offload: '{offload}' is not one of none, cpu (evaluation changes no layer, so nothing is written)")
    if json_path is not None and (json_path.is_dir() or (json_path.exists() and not json_path.is_file())):
        _fail(f"--json: '{json_path}' exists and is not a file")
    if json_path is not None and not json_path.resolve().parent.is_dir():
        _fail(f"--json: the folder of '{json_path}' does not exist")
    try:  # the text first, with the tokenizer alone: a bad source fails before the model loads
        windows = sequential_windows(load_tokenizer(model), source, seq_len, max_windows)
        graph = load_graph(model, dtype, device=device, offload=offload)
    except _user_errors() as exc:
        _fail(str(exc))
    from a3q.metrics.layerwise import layerwise_scorer

    result = perplexity(graph.model, windows, layerwise=layerwise_scorer(graph, batch_size=4))
    payload = {
        "model": model,
        **source.summary(),
        "seq_len": seq_len,
        "windows": result.windows,
        "predicted_tokens": result.predicted_tokens,
        "perplexity": result.perplexity,
        "params": graph.decoder_linear_params(),
        "kv_bytes_per_token": graph.kv_bytes_per_token(),
    }
    console.print(f"perplexity {result.perplexity:.4f} on {source.describe()} ({result.windows} × {seq_len} tokens)")
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

    import a3q.arch.auto  # noqa: F401
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


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    artifact: Path = typer.Argument(..., help="an a3q artifact folder (Llama family or Gemma 3)"),
    port: int = typer.Option(8000, help="the port of the OpenAI-compatible server"),
    host: Optional[str] = typer.Option(None, help="the address to listen on (vLLM's default when not given)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the vLLM command instead of running it"),
) -> None:
    """Serve an artifact with vLLM's OpenAI-compatible server and a3q's plugin (docs/serving.md); arguments after
    ``--`` go to vLLM. The artifact is checked here first; vLLM runs from ``.venv-serve`` (``make serve-setup``)."""
    from a3q.serving.checks import ServeRefusal
    from a3q.serving.command import ServeError
    from a3q.serving.command import serve as start_server

    try:
        argv = start_server(artifact, port, host, [a for a in ctx.args if a != "--"], exec_=not dry_run)
    except (ServeRefusal, ServeError) as exc:
        _fail(str(exc))
    console.print(" ".join(argv), soft_wrap=True, highlight=False)


if __name__ == "__main__":
    app()
