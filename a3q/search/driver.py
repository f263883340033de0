"""``a3q search``: rank every candidate by proxy, build the best-ranked for real, write the front.

```
DIR/search-state.json   the space, the proxy scores, every finished point (written atomically after each)
DIR/a3/<a3 key>/        one A³ build (+ its artifact) shared by every candidate with that A³ setting
DIR/runs/<key>/         each built candidate: the engine's run folder, its artifact in artifact/
DIR/front.json|csv|png, best.yaml, report.json     (a3q.search.outputs)
```

Reuse: the model and the calibration windows load once for the proxy's single statistics pass
(:mod:`a3q.search.proxy`); a candidate's A³ part is built once per (ratio, allocation) and the quantizer/KV recipes
load that artifact as their model. Honesty: each built candidate is evaluated by the engine on the space's held-out
text, and its size is read from its artifact's safetensors headers; the budget is checked on that measured size.

Resume (``resume=True``): finished candidates are skipped (their points are in the state file), a half-finished
engine run continues from its own checkpoint, and the proxy scores are not recomputed.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from tqdm import tqdm

from a3q.calib.windows import random_windows
from a3q.checkpoint.store import CheckpointFolder
from a3q.engine import StageError, output_lock, run_recipe
from a3q.io.json_file import read_json_file
from a3q.io.loading import load_graph
from a3q.io.manifest import MANIFEST_NAME
from a3q.io.model_folder import config_json
from a3q.io.run_lock import prepare_output_folder
from a3q.io.shards import weight_files
from a3q.placement import dtype_name, resolve_device, resolve_dtype
from a3q.recipe import parse_recipe
from a3q.search.candidate import Candidate
from a3q.search.front import measured_budget_problems, pick_best, select_for_build, spearman
from a3q.search.outputs import front_table, write_outputs
from a3q.search.proxy import collect_proxy_statistics, proxy_score
from a3q.search.sizes import ModelShape, SizeEstimate, artifact_linear_bytes
from a3q.search.space import SearchSpace, SpaceError, load_space
from a3q.search.state import SearchRefused, SearchState

MAX_REPORT_BYTES = 64 << 20


@dataclass
class SearchResult:
    """What a search measured: every built point, the pick (None when none is within the budget), the folder."""

    points: list[dict[str, Any]]
    best: dict[str, Any] | None
    out: Path


def run_search(space_file: str | Path, out: str | Path, resume: bool = False, console: Console | None = None,
               progress: bool = True, a3_dir: str | Path | None = None) -> SearchResult:
    """Validate the space (nothing loads before), then proxy, build, measure and write; see the module docstring.

    ``a3_dir`` (default ``OUT/a3``): where the shared A³ builds go; searches of one model with one calibration (the
    benchmark's budgets) can share it, since an A³ build does not depend on the budget. A build there whose recipe
    differs from this search's is refused, never replaced."""
    space, shape, sizes = load_space(space_file)
    raw = space.model_dump(mode="json")
    out = prepare_output_folder(Path(out))
    console = console or Console(stderr=True)
    with output_lock(out):
        state = SearchState.open(out / "search-state.json", raw, resume)
        started = time.perf_counter()
        candidates = space.candidates()
        if state.proxy is None:
            state.proxy, state.proxy_seconds = _proxy_scores(space, candidates, progress)
            state.save()
        scores = {c: state.proxy[c.key] for c in candidates}
        chosen = select_for_build(candidates, sizes, scores, space.budget, space.evaluate_top)
        inside = sum(1 for c in candidates if not space.budget.size_problems(sizes[c]))
        console.print(f"[bold]a3q search[/]: {len(candidates)} candidates, {inside} inside the budget by estimate; "
                      f"building {len(chosen)} (proxy pass {state.proxy_seconds:.0f} s)")
        failed: dict[str, str] = {}
        for candidate in tqdm(chosen, desc="search: candidates", unit="candidate", disable=not progress):
            if candidate.key in state.points:
                continue
            try:
                point = _build(space, shape, sizes[candidate], scores[candidate], candidate, out, state, console,
                               Path(a3_dir) if a3_dir is not None else out / "a3")
            except StageError as exc:  # one candidate's failure (its report.json says why) must not cost the front
                failed[candidate.key] = str(exc)
                console.print(f"[red]{candidate.key} failed[/] (not in the front; --resume retries it): {exc}")
                continue
            state.points[candidate.key] = point
            state.save()
            console.print(front_table(list(state.points.values()), space.budget))
        points = [state.points[c.key] for c in candidates if c.key in state.points]  # also those built before a
        # resume with a smaller evaluate_top
        best = pick_best(points, space.budget)
        write_outputs(out, space, points, best, shape, state, time.perf_counter() - started, failed)
        console.print(front_table(points, space.budget, title="a3q search: every built point (★ = the pick)",
                                  best=best))
        rho = spearman([p["proxy"] for p in points], [p["ppl"] for p in points])
        if rho is not None:
            console.print(f"proxy against measured perplexity: Spearman {rho:.3f} over {len(points)} built points")
        if best is None:
            console.print("[red]no built candidate is within the budget on its real artifact[/]")
        return SearchResult(points, best, out)


def _proxy_scores(space: SearchSpace, candidates: list[Candidate], progress: bool) -> tuple[dict[str, float], float]:
    """One load of the model and the windows, one statistics pass, a score per candidate."""
    started = time.perf_counter()
    device = resolve_device(space.device)
    dtype = resolve_dtype(space.dtype, config_json(space.model, space.revision), device)
    graph = load_graph(space.model, dtype=dtype_name(dtype), device=device, revision=space.revision)
    cal = space.calibration
    windows = random_windows(graph.tokenizer, cal.source(), cal.seq_len, cal.windows, cal.seed)
    stats = collect_proxy_statistics(graph, windows, candidates, progress=progress)
    scores = {c.key: float(proxy_score(stats, c)) for c in candidates}
    return scores, time.perf_counter() - started


def _build(space: SearchSpace, shape: ModelShape, size: SizeEstimate, score: float, candidate: Candidate, out: Path,
           state: SearchState, console: Console, a3_dir: Path) -> dict[str, Any]:
    """Build and measure one candidate (reusing its A³ artifact); its point for front.json."""
    model, rest = space.model, candidate.stages()
    if candidate.a3_ratio > 0:
        if candidate.a3_key not in state.a3_artifacts:  # its time is reported once, in report.json's a3_artifacts
            a3_started = time.perf_counter()
            path = build_a3(space, candidate, a3_dir / candidate.a3_key, console)
            state.a3_artifacts[candidate.a3_key] = {"path": path, "seconds": time.perf_counter() - a3_started}
            state.save()
        model = state.a3_artifacts[candidate.a3_key]["path"]
        rest = rest[1:]
    started = time.perf_counter()
    folder = out / "runs" / candidate.key
    artifact = folder / "artifact"
    raw = space.recipe_for(candidate, model=model, stages=rest)
    raw["stages"].append({"stage": "export", "path": str(artifact)})
    report = _run(raw, folder, console)
    ppl = next(row["ppl"] for row in reversed(report["stages"]) if row.get("ppl") is not None)
    linear_bytes = artifact_linear_bytes(artifact, shape.family)
    point = {
        "key": candidate.key, "stages": candidate.stages(), "recipe": space.recipe_for(candidate),
        "ppl": float(ppl), "proxy": score,
        "linear_bytes": linear_bytes, "estimated_linear_bytes": size.linear_bytes,
        "bits_per_param": 8 * linear_bytes / shape.linear_params(),
        "kv_bytes_per_token": float(report["stages"][-1]["kv_bytes_per_token"]),
        "artifact_bytes": sum(file.stat().st_size for file in artifact.rglob("*") if file.is_file()),
        "artifact": str(artifact), "seconds": time.perf_counter() - started,
    }
    point["budget_problems"] = measured_budget_problems(space.budget, point)
    point["within_budget"] = not point["budget_problems"]
    return point


def build_a3(space: SearchSpace, candidate: Candidate, folder: Path, console: Console | None = None) -> str:
    """``candidate``'s A³ part alone, built (an engine run, resumable) and exported to ``folder/artifact``, or the
    finished build already there; returns the artifact's path."""
    artifact = folder / "artifact"
    raw = {**space.header(), "stages": [candidate.a3_stage(), {"stage": "export", "path": str(artifact)}]}
    _run(raw, folder, console or Console(stderr=True))
    return str(artifact)


def _run(raw: dict[str, Any], folder: Path, console: Console) -> dict[str, Any]:
    """Run one recipe into ``folder`` through the engine and return its report; a finished run is read back, a
    stopped one resumes from its checkpoint, anything else half-written is started again."""
    report = finished_report(folder)
    if report is not None:
        if report.get("recipe") != raw:
            raise SearchRefused(f"'{folder}' holds a build of another recipe; search into another folder")
        return report
    resume = CheckpointFolder(folder / "checkpoint").exists()
    export = Path(raw["stages"][-1]["path"])
    if export.exists():  # written by a run that did not finish: it is rebuilt (the search's own folder)
        shutil.rmtree(export)
    if not resume and folder.exists():
        shutil.rmtree(folder)
    result = run_recipe(parse_recipe(raw), folder, console=console, show_table=False, resume=resume)
    return result.report.to_json()


def finished_report(folder: Path) -> dict[str, Any] | None:
    """The report of a finished engine run in ``folder`` whose artifact (``folder/artifact``) is whole, or None."""
    path = folder / "report.json"
    if not path.is_file():
        return None
    report = read_json_file(path, MAX_REPORT_BYTES)
    artifact = folder / "artifact"
    complete = isinstance(report, dict) and report.get("status") == "complete"
    if complete and (artifact / MANIFEST_NAME).is_file() and weight_files(artifact):
        return report
    return None


__all__ = ["SearchResult", "SpaceError", "run_search"]
