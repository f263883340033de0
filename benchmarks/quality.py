"""Quality of A³ on the real SmolLM2-135M: perplexity vs compression ratio, per-component ablations,
and the cost of rounding ranks to kernel-friendly multiples.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py --json out/bench/quality.json

Protocol: calibration = 32 random windows × 512 tokens of enwiki/calib (seed 0), statistics
collected once from the dense model; evaluation = the first 40 windows × 512 tokens of
enwiki/test (20,440 predicted tokens). ``params`` counts decoder linear weights only
(embeddings and LM head excluded); KV bytes per token are for an fp32 cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from a3q.calib.windows import random_windows, sequential_windows
from a3q.io.loading import load_graph
from a3q.metrics.perplexity import perplexity
from a3q.stages.a3.apply import as_a3_graph, compress_model
from a3q.stages.a3.ranks import plan_ranks
from a3q.stages.a3.statistics import collect_statistics

ALL = ("qk", "ov", "mlp")


def configurations(ratios: list[float]) -> list[tuple[str, dict, tuple[str, ...], int]]:
    """(label, component ratios, components, rank multiple) rows of the table."""
    rows = [(f"A³ {r:.0%}", {c: r for c in ALL}, ALL, 1) for r in ratios]
    rows += [(f"A³ 10% {c} only", {c: 0.1}, (c,), 1) for c in ALL]
    rows += [(f"A³ 20% ranks ×{m}", {c: 0.2 for c in ALL}, ALL, m) for m in (8, 32)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    graph = as_a3_graph(load_graph("smollm2-135m"))
    calib = random_windows(graph.tokenizer, "enwiki", "calib", args.seq_len, args.calib_windows, seed=0)
    test = sequential_windows(graph.tokenizer, "enwiki", "test", args.seq_len, args.eval_windows)
    started = time.perf_counter()
    stats = collect_statistics(graph, calib, set(ALL))
    calibration_seconds = time.perf_counter() - started

    dense_ppl = perplexity(graph.model, test).perplexity
    dense_params, dense_kv = graph.decoder_linear_params(), graph.kv_bytes_per_token()
    rows = [dict(method="dense", ratio=0.0, ppl=dense_ppl, params=dense_params, kv_bytes_per_token=dense_kv, qk=64, vo=64, ff=1536, seconds=0.0)]
    for label, ratios, components, multiple in configurations(args.ratios):
        plans = plan_ranks(graph.layers, ratios, {}, multiple, rope=True)
        started = time.perf_counter()
        compressed, _ = compress_model(graph, stats, plans, 1e-6, frozenset(components), progress=False)
        seconds = time.perf_counter() - started
        rows.append(dict(
            method=label, ratio=1 - compressed.decoder_linear_params() / dense_params,
            ppl=perplexity(compressed.model, test).perplexity, params=compressed.decoder_linear_params(),
            kv_bytes_per_token=compressed.kv_bytes_per_token(), qk=plans[0].qk, vo=plans[0].vo, ff=plans[0].ff,
            seconds=seconds,
        ))
        del compressed

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    table = Table(title=f"A³ on SmolLM2-135M, enwiki/test {args.eval_windows}×{args.seq_len} ({date.today()}, {machine})")
    for column in ["method", "achieved ratio", "ppl", "× dense", "params (M)", "KV B/token", "q/k, v/o, ff", "decomp s"]:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(
            row["method"], f"{row['ratio']:.3f}", f"{row['ppl']:.2f}", f"{row['ppl'] / dense_ppl:.2f}",
            f"{row['params'] / 1e6:.1f}", f"{row['kv_bytes_per_token']:,.0f}", f"{row['qk']}, {row['vo']}, {row['ff']}",
            f"{row['seconds']:.1f}",
        )
    Console().print(table)
    Console().print(f"calibration ({args.calib_windows}×{args.seq_len} tokens): {calibration_seconds:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": str(date.today()), "machine": machine, "calibration_seconds": calibration_seconds, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
