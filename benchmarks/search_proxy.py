"""How well the search's proxy ranks compositions on SmolLM2-135M: its cost, its scores, and real perplexities.

Protocol: calibration 16 × 512 random windows of enwiki/calib (seed 0); evaluation the first 8 × 512 windows of
enwiki/test; one torch thread. Three parts, which can run as separate processes (the machine has 2 cores):

* ``--part proxy``: ``collect_proxy_statistics`` on A³ {0, 10, 20, 30%} (global) × {none, GPTQ 4-bit g64, GPTQ
  3-bit g64, nf4}: pass and probe time, peak memory (RSS), every candidate's score by term;
* ``--part real``: those of ``--real`` built for real with ``a3q.engine.apply_stage`` (an A³+quantizer candidate
  reuses its A³ build) and their perplexity;
* ``--part report``: both JSON files merged into one table, with the Spearman rank correlation between the proxy and
  the real log-perplexity increase over the dense model.

    python benchmarks/search_proxy.py --part proxy --json out/proxy.json
    python benchmarks/search_proxy.py --part real --json out/real.json
    python benchmarks/search_proxy.py --part real --real a3-0.1+nf4,a3-0.3+none --json out/real2.json
    python benchmarks/search_proxy.py --part report --proxy-json out/proxy.json --real-json out/real.json out/real2.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from a3q.atomic import write_json_atomic
from a3q.calib.sources import enwiki
from a3q.calib.windows import random_windows, sequential_windows
from a3q.engine import apply_stage
from a3q.io.loading import load_graph
from a3q.metrics.perplexity import perplexity
from a3q.search.candidate import Candidate
from a3q.search.front import spearman
from a3q.search.proxy import collect_proxy_statistics, proxy_score

QUANTIZERS = {
    "none": None,
    "gptq4g64": (("bits", 4), ("group_size", 64), ("stage", "gptq")),
    "gptq3g64": (("bits", 3), ("group_size", 64), ("stage", "gptq")),
    "nf4": (("quant_type", "nf4"), ("stage", "bnb")),
}
RATIOS = (0.0, 0.1, 0.2, 0.3)
REAL = "dense+gptq4g64,dense+gptq3g64,dense+nf4,a3-0.1+none,a3-0.1+gptq4g64,a3-0.2+none,a3-0.2+nf4"


def candidates() -> dict[str, Candidate]:
    """Short name → candidate: every ratio × quantizer (global allocation)."""
    out = {}
    for ratio in RATIOS:
        for name, fields in QUANTIZERS.items():
            out[f"{'dense' if ratio == 0 else f'a3-{ratio:g}'}+{name}"] = Candidate(ratio, "global", fields)
    return out


def run_proxy(dense, calib, a3_probes: str) -> dict:
    space = candidates()
    started = time.perf_counter()
    stats = collect_proxy_statistics(dense, calib, list(space.values()), progress=True, a3_probes=a3_probes)
    rows = {name: dict(total=proxy_score(stats, c), a3=stats.scores[c].a3, weights=stats.scores[c].weights)
            for name, c in space.items()}
    return dict(seconds=time.perf_counter() - started, parts=stats.seconds, rows=rows,
                fisher_scale={str(dict(q)): v for q, v in stats.fisher_scale.items()},
                plans={f"{r}-{a}": [vars(p) for p in plans] for (r, a), plans in stats.plans.items()},
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_real(dense, calib, test, names: list[str], emit) -> dict:
    space = candidates()
    rows = {"dense+none": dict(ppl=perplexity(dense.model, test, progress=False).perplexity, seconds=0.0)}
    emit(rows)
    built = {}
    for name in names:
        candidate, started = space[name], time.perf_counter()
        graph = dense
        if candidate.a3_ratio > 0:
            key = (candidate.a3_ratio, candidate.allocation)
            if key not in built:
                built[key], _ = apply_stage(copy.deepcopy(dense), "a3", windows=calib, ratio=candidate.a3_ratio,
                                            allocation=candidate.allocation)
            graph = built[key]
        if candidate.weights is not None:
            fields = dict(candidate.weights)
            graph, _ = apply_stage(copy.deepcopy(graph), fields.pop("stage"), windows=calib, **fields)
        rows[name] = dict(ppl=perplexity(graph.model, test, progress=False).perplexity,
                          seconds=time.perf_counter() - started)
        emit(rows)
    return rows


def report(proxy: dict, real: dict) -> None:
    dense_ppl = real["dense+none"]["ppl"]
    table = Table(title="Search proxy vs real, SmolLM2-135M (A³ global), enwiki/test 8×512, calibration 16×512")
    for column in ("candidate", "proxy KL", "A³ term", "weights term", "real ppl", "log-ppl increase"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    measured = []
    for name, row in proxy["rows"].items():
        ppl = real.get(name, {}).get("ppl")
        increase = None if ppl is None else math.log(ppl / dense_ppl)
        if increase is not None and name != "dense+none":
            measured.append((row["total"], increase))
        table.add_row(name, f"{row['total']:.4f}", f"{row['a3']:.4f}", f"{row['weights']:.4f}",
                      "" if ppl is None else f"{ppl:.2f}", "" if increase is None else f"{increase:.4f}")
    console = Console()
    console.print(table)
    if len(measured) > 2:
        rho = spearman([p for p, _ in measured], [r for _, r in measured])
        shown = "undefined (fewer than 3 points or a constant side)" if rho is None else f"{rho:.3f}"
        console.print(f"Spearman(proxy, real log-ppl increase) over {len(measured)} compressed points: {shown}")
    parts = json.dumps({k: round(v, 1) for k, v in proxy["parts"].items()})
    console.print(f"proxy: {proxy['seconds']:.0f} s in all, parts {parts}, peak RSS {proxy['peak_rss_mib']:.0f} MiB, "
                  f"Fisher scales {proxy.get('fisher_scale')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("proxy", "real", "report"), required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--proxy-json", type=Path)
    parser.add_argument("--real-json", type=Path, nargs="+", help="one or more --part real outputs, merged")
    parser.add_argument("--a3-probes", choices=("once", "each"), default="once")
    parser.add_argument("--real", default=REAL, help="comma-separated candidates to build for real")
    args = parser.parse_args()
    if args.part == "report":
        real = {}
        for path in args.real_json:
            real.update(json.loads(path.read_text()))
        report(json.loads(args.proxy_json.read_text()), real)
        return
    torch.set_num_threads(1)
    dense = load_graph("smollm2-135m")
    calib = random_windows(dense.tokenizer, enwiki("calib"), 512, 16, seed=0)

    def emit(result: dict) -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(args.json, result)

    if args.part == "proxy":
        emit(run_proxy(dense, calib, args.a3_probes))
    else:
        test = sequential_windows(dense.tokenizer, enwiki("test"), 512, 8)
        run_real(dense, calib, test, args.real.split(","), emit)


if __name__ == "__main__":
    main()
