"""KV-cache compression on the real SmolLM2-135M: bytes per token, perplexity with the cache in the loop, and
greedy-generation agreement with the dense model.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/kv.py --threads 1 --json out/bench/kv.json

Protocol: perplexity on the first ``--windows`` (default 4) windows × 2048 tokens of enwiki/test, each window fed in
chunks of 64 tokens through the model's KV cache (so every chunk reads earlier keys/values back from the cache, where
the quantized rows quantize them). A³ and KV-rank rows are calibrated on 16 random windows × 512 tokens of
enwiki/calib (seed 0, statistics collected once from the dense model). Generation: 20 prompts of 256 tokens cut from
enwiki/test after the evaluation windows, 64 greedy new tokens, compared position by position with the dense model.
KV bytes per token count full-precision caches at bf16 (2 bytes) and quantized caches exactly (codes + fp16
scales/zeros; the full-precision residual window of recent tokens is a constant and not included). The model itself
runs in float32 on CPU. Default run: 23 minutes with ``--threads 1`` on 2 cores shared with other jobs (load 6–8);
less on an idle machine. ``--windows`` is the main cost.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from a3q.calib.sources import enwiki

from a3q.calib.windows import random_windows, sequential_windows
from a3q.graph import ModelGraph
from a3q.io.loading import load_graph
from a3q.metrics.perplexity import perplexity
from a3q.stages.a3.apply import as_a3_graph, compress_model
from a3q.stages.a3.ranks import plan_ranks
from a3q.stages.a3.statistics import collect_statistics
from a3q.stages.kv import KVConfig, bf16_equivalent_bytes, plan_kv_ranks

try:  # run as a script from the repository root or as a module
    from bench_common import machine_info, machine_line
except ImportError:  # pragma: no cover
    from benchmarks.bench_common import machine_info, machine_line

ROWS = ("dense", "A³ 20%", "kv_ratio 0.3", "kv_ratio 0.5", "8-bit cache", "4-bit cache", "A³ 20% + 8-bit cache")


def build(label: str, dense: ModelGraph, stats: list, cache: dict) -> ModelGraph:
    """The graph of one table row (A³ 20% is built once and reused by the last row)."""
    a3 = as_a3_graph(dense)
    if label == "dense":
        return dense
    if label.startswith("A³ 20%"):
        if "a3" not in cache:
            plans = plan_ranks(a3.layers, {c: 0.2 for c in ("qk", "ov", "mlp")}, {}, 1, a3.uses_rope)
            cache["a3"] = compress_model(a3, stats, plans, 1e-6, progress=False)[0]
        graph = cache["a3"]
        if label == "A³ 20%":
            return graph
        graph = copy.deepcopy(graph)  # the cache setting lives on the model: a copy of its own
        graph.set_kv_cache({"bits": 8})
        return graph
    if label.startswith("kv_ratio"):
        config = KVConfig(kv_ratio=float(label.split()[1]))
        return copy.deepcopy(compress_model(a3, stats, plan_kv_ranks(a3, config), config.damping,
                                            frozenset({"qk", "ov"}), progress=False)[0])
    graph = copy.deepcopy(dense)
    graph.set_kv_cache({"bits": int(label.split("-")[0])})
    return graph


@torch.no_grad()
def greedy(graph: ModelGraph, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of equal-length prompts (no padding, so cache groups never hold pad tokens)."""
    out = graph.model.generate(
        prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=graph.tokenizer.eos_token_id,
    )
    return out[:, prompts.shape[1] :]


def agreement(tokens: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(fraction of positions equal to the reference, mean length of the identical prefix)."""
    equal = tokens == reference
    prefix = torch.where(equal.all(1), equal.shape[1], (~equal).int().argmax(1)).float()
    return float(equal.float().mean()), float(prefix.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is much faster on a loaded machine)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info("cpu")
    started = time.perf_counter()

    dense = load_graph("smollm2-135m")
    tokenizer = dense.tokenizer
    calib = random_windows(tokenizer, enwiki("calib"), 512, args.calib_windows, seed=0)
    test = sequential_windows(tokenizer, enwiki("test"), args.seq_len, args.windows)
    pool = sequential_windows(tokenizer, enwiki("test"), args.prompt_len, None)
    offset = -(-args.windows * args.seq_len // args.prompt_len)
    step = max(1, (pool.shape[0] - offset) // args.prompts)
    prompts = pool[offset::step][: args.prompts]
    stats = collect_statistics(as_a3_graph(dense), calib, {"qk", "ov", "mlp"}, progress=False) if args.rows != ["dense"] else []
    reference = greedy(dense, prompts, args.new_tokens)
    dense_bytes = bf16_equivalent_bytes(dense)

    rows, built = [], {}
    for label in args.rows:
        row_started = time.perf_counter()
        graph = build(label, dense, stats, built)
        ppl = perplexity(graph.model, test, batch_size=1, cache_chunk=args.chunk, description=label).perplexity
        match, prefix = (1.0, float(args.new_tokens)) if label == "dense" else agreement(greedy(graph, prompts, args.new_tokens), reference)
        layer = graph.layers[0]
        rows.append({
            "config": label,
            "qk_rank": layer.qk_head_dim,
            "vo_rank": layer.vo_head_dim,
            "cache": f"{graph.kv_cache['bits']}-bit" if graph.kv_cache else "bf16",
            "kv_bytes_per_token": bf16_equivalent_bytes(graph),
            "compression_vs_bf16": dense_bytes / bf16_equivalent_bytes(graph),
            "ppl": ppl,
            "generation_match": match,
            "identical_prefix": prefix,
            "seconds": time.perf_counter() - row_started,
        })
        Console(stderr=True).log(f"{label}: ppl {ppl:.3f}, match {match:.1%} ({rows[-1]['seconds']:.0f} s)")

    table = Table(title=f"KV cache: SmolLM2-135M, enwiki/test {args.windows}×{args.seq_len} tokens, chunks of {args.chunk}")
    for column in ("config", "r_qk/r_vo", "cache", "KV B/token", "× vs bf16", "ppl", "Δppl", "gen match", "same prefix"):
        table.add_column(column, justify="left" if column in ("config", "cache") else "right")
    base = rows[0]["ppl"] if rows[0]["config"] == "dense" else None
    for row in rows:
        delta = "" if base is None else f"{row['ppl'] - base:+.3f}"
        table.add_row(
            row["config"], f"{row['qk_rank']}/{row['vo_rank']}", row["cache"], f"{row['kv_bytes_per_token']:,.0f}",
            f"{row['compression_vs_bf16']:.2f}", f"{row['ppl']:.3f}", delta, f"{row['generation_match']:.1%}",
            f"{row['identical_prefix']:.1f}/{args.new_tokens}",
        )
    console = Console()
    console.print(table)
    console.print(machine_line(info))
    console.print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
