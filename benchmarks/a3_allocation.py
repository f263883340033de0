"""A³ global rank allocation on the real SmolLM2-135M: how wide may each layer's budget move (``max_shift``), and
do probes taken at the stage's own ratio beat one shared set of probes?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/a3_allocation.py --threads 1 --json out/bench/a3_allocation.json
    .venv/bin/python benchmarks/a3_allocation.py --table out/bench/a3_allocation.json

Protocol (the README's reduced one, so the numbers sit next to its baseline table): statistics from
``--calib-windows`` × 512 tokens of enwiki/calib (seed 0), collected once from the dense model; evaluation on the
first ``--eval-windows`` × 512 windows of enwiki/test. For every ratio: A³ uniform, then A³ global with probes at
that ratio (``probe_windows`` × ``probe_seq_len`` calibration tokens, KL) for every ``--shifts`` value, where
``1.0`` means "unbounded within the floor" (each component keeps at least ``allocation.MIN_KEEP`` of its size);
and, for ratios other than ``--shared-probe-ratio``, A³ global with the probes of that ratio (as the README's
earlier table did) at ``--shared-shifts``. Probes are measured once per ratio and reused by every shift (the greedy
is deterministic given them). Every row has the same parameter count as A³ uniform at its ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine_info, machine_line

ALL = ("qk", "ov", "mlp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--shifts", type=float, nargs="+", default=[0.1, 0.2, 0.3, 1.0])
    parser.add_argument("--shared-probe-ratio", type=float, default=0.2)
    parser.add_argument("--shared-shifts", type=float, nargs="*", default=[0.1])
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--probe-windows", type=int, default=2)
    parser.add_argument("--probe-seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--table", type=Path, nargs="+", default=None)
    args = parser.parse_args()
    if args.table:
        for path in args.table:
            print_table(json.loads(path.read_text()))
        return

    import torch

    from a3q.calib.sources import enwiki

    from a3q.calib.windows import random_windows, sequential_windows
    from a3q.io.loading import load_graph
    from a3q.metrics.perplexity import perplexity
    from a3q.stages.a3.allocation import MIN_KEEP, plan_global_ranks
    from a3q.stages.a3.apply import compress_model

    try:
        from a3q.arch.surgery import as_a3_graph
    except ImportError:  # before the pipeline refactor
        from a3q.stages.a3.apply import as_a3_graph
    from a3q.stages.a3.ranks import plan_ranks
    from a3q.stages.a3.statistics import collect_statistics

    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    result = dict(benchmark="a3_allocation", machine=machine_info("cpu"), settings={k: str(v) if isinstance(v, Path) else v
                                                                                    for k, v in vars(args).items()},
                  min_keep=MIN_KEEP, rows=[])

    def emit(row: dict) -> None:
        result["rows"].append(row)
        console.log({k: v for k, v in row.items() if k not in ("plans", "sensitivity")})
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2, default=str))

    dense = load_graph("smollm2-135m")
    calib = random_windows(dense.tokenizer, enwiki("calib"), args.seq_len, args.calib_windows, seed=0)
    test = sequential_windows(dense.tokenizer, enwiki("test"), args.seq_len, args.eval_windows)
    probes = calib[: args.probe_windows, : args.probe_seq_len]
    graph = as_a3_graph(dense)
    started = time.perf_counter()
    stats = collect_statistics(graph, calib, set(ALL), progress=False)
    result["statistics_seconds"] = time.perf_counter() - started
    emit(dict(method="dense", ratio=0.0, target=0.0, ppl=perplexity(dense.model, test, progress=False).perplexity,
              params=dense.decoder_linear_params(), seconds=0.0, probe_ratio=None, max_shift=None))
    params_dense = dense.decoder_linear_params()

    def evaluate(plans, method, target, seconds, **extra) -> None:
        compressed, _ = compress_model(graph, stats, plans, 1e-6, frozenset(ALL), progress=False)
        ppl = perplexity(compressed.model, test, progress=False).perplexity
        params = compressed.decoder_linear_params()
        ranges = {key: (min(getattr(p, key) for p in plans), max(getattr(p, key) for p in plans)) for key in ("qk", "vo", "ff")}
        emit(dict(method=method, target=target, ratio=1 - params / params_dense, ppl=ppl, params=params, seconds=seconds,
                  ranges=ranges, plans=[vars(p) for p in plans], **extra))
        del compressed

    sensitivities: dict[float, dict] = {}

    def probe(ratio: float) -> dict:
        if ratio not in sensitivities:
            started = time.perf_counter()
            sensitivities[ratio] = plan_global_ranks(graph, stats, {c: ratio for c in ALL}, probes, 1, 1e-6, 0.1,
                                                     progress=False).sensitivity
            result.setdefault("probe_seconds", {})[str(ratio)] = time.perf_counter() - started
        return sensitivities[ratio]

    ordered = sorted(args.ratios, key=lambda r: r != args.shared_probe_ratio)  # the shared probes first
    for ratio in ordered:
        ratios = {c: ratio for c in ALL}
        evaluate(plan_ranks(graph.layers, ratios, {}, 1, rope=True), "uniform", ratio, 0.0, probe_ratio=None, max_shift=None)
        variants = [(ratio, shift) for shift in args.shifts]
        if ratio != args.shared_probe_ratio:
            variants += [(args.shared_probe_ratio, shift) for shift in args.shared_shifts]
        for probe_ratio, shift in variants:
            sensitivity = probe(probe_ratio)
            started = time.perf_counter()
            allocation = plan_global_ranks(graph, stats, ratios, probes, 1, 1e-6, shift, progress=False,
                                           sensitivity=sensitivity)
            evaluate(allocation.plans, "global", ratio, time.perf_counter() - started, probe_ratio=probe_ratio,
                     max_shift=shift, sensitivity=sensitivity)
    print_table(result)


def print_table(result: dict) -> None:
    rows = result["rows"]
    dense = next(r["ppl"] for r in rows if r["method"] == "dense")
    uniform = {r["target"]: r["ppl"] for r in rows if r["method"] == "uniform"}
    s = result["settings"]
    table = Table(title=f"A³ global allocation, SmolLM2-135M, enwiki/test {s['eval_windows']}×{s['seq_len']}, "
                        f"calibration {s['calib_windows']}×{s['seq_len']}, probes {s['probe_windows']}×{s['probe_seq_len']} (KL)")
    for column in ("target", "allocation", "probes at", "max_shift", "achieved ratio", "ppl", "× dense", "vs uniform",
                   "q/k", "v/o", "ff"):
        table.add_column(column, justify="left" if column == "allocation" else "right")
    for r in rows:
        if r["method"] == "dense":
            continue
        shift = r.get("max_shift")
        shift_text = "—" if shift is None else (f"none (floor {result.get('min_keep', 0.25):.2f})" if shift >= 1 else f"±{shift:.1f}")
        ranges = r.get("ranges", {})
        fmt = lambda key: "—" if key not in ranges else (f"{ranges[key][0]}" if ranges[key][0] == ranges[key][1]  # noqa: E731
                                                          else f"{ranges[key][0]}–{ranges[key][1]}")
        change = r["ppl"] / uniform[r["target"]] - 1 if r["target"] in uniform else math.nan
        table.add_row(f"{r['target']:.0%}", r["method"], "—" if r.get("probe_ratio") is None else f"{r['probe_ratio']:.0%}",
                      shift_text, f"{r['ratio']:.3f}", f"{r['ppl']:.2f}", f"{r['ppl'] / dense:.2f}",
                      "—" if r["method"] == "uniform" else f"{change:+.1%}", fmt("qk"), fmt("vo"), fmt("ff"))
    console = Console(width=200)
    console.print(table)
    console.print(f"dense ppl {dense:.2f}; probes: " + ", ".join(f"{k}: {v:.0f} s" for k, v in result.get("probe_seconds", {}).items()))
    console.print(machine_line(result["machine"]))


if __name__ == "__main__":
    main()
