"""Low rank × quantization on the real SmolLM2-135M: perplexity against bytes of linear weights.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quant_quality.py --threads 2 --json out/bench/quant.json

Each row is a recipe run by the engine (so A³ + GPTQ rows use the shared layer-by-layer pass), then ``evaluate``.
Protocol: calibration = ``--calib-windows`` random windows × 512 tokens of enwiki/calib (seed 0); evaluation = the
first ``--eval-windows`` windows × 512 tokens of enwiki/test. ``weight bytes`` counts the decoder's linear weights
as stored (float at bf16; GPTQ codes + fp16 scales + packed zeros + g_idx; bitsandbytes codes + absmax/statistics),
embeddings and LM head excluded; ``× vs bf16`` divides the dense model's bf16 bytes by it. SmolLM2's weights come
from a Q4_1 GGUF (groups of 32), so GPTQ uses group 64: with group 32 it could re-find the original grid.
``seconds`` is the compression stages' time (not the evaluation).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import finish, machine_info, print_with_context  # noqa: E402

GPTQ4 = {"stage": "gptq", "bits": 4, "group_size": 64, "sym": True}
NF4 = {"stage": "bnb", "quant_type": "nf4"}
INT8 = {"stage": "bnb", "quant_type": "int8"}
ROWS: dict[str, list[dict]] = {
    "dense": [],
    "gptq4": [GPTQ4],
    "nf4": [NF4],
    "int8": [INT8],
    "a3-10": [{"stage": "a3", "ratio": 0.1}],
    "a3-20": [{"stage": "a3", "ratio": 0.2}],
    "a3-10+gptq4": [{"stage": "a3", "ratio": 0.1}, GPTQ4],
    "a3-20+gptq4": [{"stage": "a3", "ratio": 0.2}, GPTQ4],
    "a3-10+nf4": [{"stage": "a3", "ratio": 0.1}, NF4],
    "a3-20+nf4": [{"stage": "a3", "ratio": 0.2}, NF4],
}


def run_row(stages: list[dict], args: argparse.Namespace) -> dict:
    from a3q.engine import run_recipe
    from a3q.recipe import parse_recipe

    recipe = parse_recipe({
        "model": "smollm2-135m",
        "calibration": {"corpus": "enwiki", "split": "calib", "windows": args.calib_windows, "seq_len": 512, "seed": 0},
        "stages": [*stages, {"stage": "evaluate", "split": "test", "seq_len": 512, "max_windows": args.eval_windows}],
    })
    result = run_recipe(recipe, args.out, show_table=False)
    rows = result.report.rows
    return {
        "ppl": rows[-1]["ppl"],
        "params": rows[-1]["params"],
        "weight_bytes": rows[-1]["weight_bytes"],
        "seconds": sum(row["seconds"] for row in rows[1:-1]),
    }


def render(result: dict) -> None:
    table = Table(title="Low rank × quantization, SmolLM2-135M, enwiki/test perplexity")
    for column in ("config", "ppl", "× dense ppl", "params", "weight bytes", "× vs bf16", "seconds"):
        table.add_column(column, justify="left" if column == "config" else "right")
    dense = next((row for row in result["rows"] if row["config"] == "dense"), None)
    for row in result["rows"]:
        table.add_row(
            row["config"], f"{row['ppl']:.2f}", f"{row['ppl'] / dense['ppl']:.2f}" if dense else "",
            f"{row['params'] / 1e6:.1f} M", f"{row['weight_bytes'] / 2**20:.1f} MiB", f"{row['compression_vs_bf16']:.2f}",
            f"{row['seconds']:.0f}",
        )
    print_with_context(table, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a loaded machine)")
    parser.add_argument("--out", type=Path, default=Path("out/bench/quant-runs"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info("cpu")
    from a3q.io.loading import load_graph

    dense_bytes = load_graph("smollm2-135m").decoder_linear_bytes()
    rows = []
    for label in args.rows:
        started = time.perf_counter()
        measured = run_row(ROWS[label], args)
        rows.append({"config": label, **measured, "compression_vs_bf16": dense_bytes / measured["weight_bytes"]})
        Console(stderr=True).log(f"{label}: ppl {measured['ppl']:.3f} ({time.perf_counter() - started:.0f} s)")
    notes = [f"calibration {args.calib_windows}×512 enwiki/calib, evaluation {args.eval_windows}×512 enwiki/test",
             "GPTQ 4-bit group 64 symmetric; bnb nf4 with double quantization; A³ uniform ranks"]
    finish("quant_quality", info, args, rows, notes, render)


if __name__ == "__main__":
    main()
