"""What a search leaves in its folder: front.json/.csv, front.png, best.yaml, report.json, and the rich table.

``front.json`` holds every built point (recipe stages, measured decoder-linear bytes, bits per parameter, KV bytes
per token, perplexity, proxy score, whether it is within the budget on its real artifact) and marks the Pareto front
and the pick. ``best.yaml`` is a complete recipe that rebuilds the pick from the space's model in one run (A³, KV,
quantizer, the same evaluation, an export). Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import matplotlib
import yaml
from rich.table import Table

from a3q.atomic import write_json_atomic
from a3q.search.front import pareto_front, spearman

matplotlib.use("Agg")  # files only: never a window, whatever the environment says
from matplotlib import pyplot  # noqa: E402 (after the backend is chosen)

CSV_COLUMNS = ("key", "linear_bytes", "bits_per_param", "kv_bytes_per_token", "ppl", "proxy", "within_budget",
               "on_front", "best", "estimated_linear_bytes", "artifact_bytes", "seconds", "stages")


def best_recipe(space: Any, best: dict[str, Any], out: Path) -> dict[str, Any]:
    """A recipe that rebuilds ``best`` from the space's model in one run and exports it to ``OUT/best``."""
    from_stages = [{"stage": stage["stage"], **{k: v for k, v in stage.items() if k != "stage"}}
                   for stage in best["stages"]]
    return {**space.header(), "stages": [*from_stages, {"stage": "evaluate",
                                                         **space.evaluate.model_dump(exclude_unset=True)},
                                         {"stage": "export", "path": str(out / "best")}]}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_outputs(out: Path, space: Any, points: list[dict[str, Any]], best: dict[str, Any] | None, shape: Any,
                  state: Any, seconds: float, failed: dict[str, str] | None = None) -> None:
    """Every output file of a finished search (see the module docstring)."""
    front_keys = {p["key"] for p in pareto_front(points)}
    rows = [{**p, "on_front": p["key"] in front_keys, "best": best is not None and p["key"] == best["key"]}
            for p in points]
    rho = spearman([p["proxy"] for p in points], [p["ppl"] for p in points])
    write_json_atomic(out / "front.json", {"budget": space.budget.given(), "points": rows,
                                           "best": best["key"] if best else None, "spearman_proxy_ppl": rho})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "stages": yaml.safe_dump(row["stages"], default_flow_style=True, width=10**6).strip()})
    _write_text(out / "front.csv", buffer.getvalue())
    plot_front(rows, out / "front.png", space.budget, shape.linear_params())
    if best is not None:
        _write_text(out / "best.yaml", "# a3q search: the best point within the budget, rebuilt in one run\n"
                    + yaml.safe_dump(best_recipe(space, best, out), sort_keys=False))
    write_json_atomic(out / "report.json", {
        "status": "complete", "model": space.model, "budget": space.budget.given(),
        "candidates": len(state.proxy or {}), "built": [p["key"] for p in points],
        "best": best, "front": sorted(front_keys), "spearman_proxy_ppl": rho, "failed": failed or {},
        "proxy_seconds": state.proxy_seconds, "a3_artifacts": state.a3_artifacts, "seconds": seconds,
        "input_linear_params": shape.linear_params(),
    })


def plot_front(rows: list[dict[str, Any]], path: Path, budget: Any, input_params: int) -> None:
    """Size (MB of decoder linears) against perplexity: every point labelled, the front drawn, the pick starred,
    the size budgets as vertical lines (``bits_per_param`` over the input model's ``input_params``)."""
    figure, axes = pyplot.subplots(figsize=(9, 6))
    try:
        for row in rows:
            colour = "tab:blue" if row["within_budget"] else "tab:gray"
            axes.scatter(row["linear_bytes"] / 1e6, row["ppl"], color=colour, marker="*" if row["best"] else "o",
                         s=160 if row["best"] else 30, zorder=3)
            axes.annotate(row["key"], (row["linear_bytes"] / 1e6, row["ppl"]), fontsize=7, xytext=(4, 3),
                          textcoords="offset points")
        front = sorted((r for r in rows if r["on_front"]), key=lambda r: r["linear_bytes"])
        axes.plot([r["linear_bytes"] / 1e6 for r in front], [r["ppl"] for r in front], color="tab:red",
                  label="front (measured)", zorder=2)
        if budget.weight_bytes is not None:
            axes.axvline(budget.weight_bytes / 1e6, color="tab:green", linestyle="--", label="weight_bytes budget")
        if budget.bits_per_param is not None:
            axes.axvline(budget.bits_per_param * input_params / 8e6, color="tab:olive", linestyle="--",
                         label="bits_per_param budget")
        if budget.max_ppl is not None:
            axes.axhline(budget.max_ppl, color="tab:green", linestyle=":", label="max_ppl")
        axes.set_xlabel("decoder linear weights on disk (MB)")
        axes.set_ylabel("perplexity (held-out)")
        axes.set_title("a3q search: measured points (grey: outside the budget, ★: the pick)")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp.png")
        figure.savefig(tmp, dpi=120)
        tmp.replace(path)
    finally:
        pyplot.close(figure)


def front_table(points: list[dict[str, Any]], budget: Any, title: str = "a3q search: the front so far",
                best: dict[str, Any] | None = None) -> Table:
    """The built points, smallest first; front points bold, the pick starred, points outside the budget dim."""
    front_keys = {p["key"] for p in pareto_front(points)} if points else set()
    table = Table(title=title)
    for column in ("candidate", "MB", "bits/param", "KV B/token", "ppl", "proxy", "budget"):
        table.add_column(column, justify="left" if column in ("candidate", "budget") else "right",
                         overflow="fold")
    for p in sorted(points, key=lambda p: p["linear_bytes"]):
        star = "★ " if best is not None and p["key"] == best["key"] else ""
        style = "bold" if p["key"] in front_keys else ("dim" if not p["within_budget"] else None)
        table.add_row(star + p["key"], f"{p['linear_bytes'] / 1e6:.2f}", f"{p['bits_per_param']:.3f}",
                      f"{p['kv_bytes_per_token']:,.0f}", f"{p['ppl']:.3f}", f"{p['proxy']:.4g}",
                      "ok" if p["within_budget"] else "; ".join(p["budget_problems"]), style=style)
    return table
