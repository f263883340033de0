"""Quality at equal size on a real model (SmolLM2-135M, or ``--model gemma3-270m``): A³ (uniform and global ranks)
against the low-rank baselines people already use (plain SVD, ASVD, SVD-LLM), at the same fraction of decoder
linear weights removed.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py --json out/bench/quality.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py --model gemma3-270m --methods dense a3 svd_llm \
        --calib-windows 16 --eval-windows 8 --json out/bench/quality-gemma3.json
    # a subset, then one table from several result files:
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py --methods svd asvd --json out/bench/a.json
    .venv/bin/python benchmarks/quality.py --table out/bench/a.json out/bench/b.json

``--methods ablations`` adds A³ with one component alone at 10% and with ranks rounded to multiples of 8 / 32;
``a3_sequential`` runs the ``a3`` stage with ``statistics: sequential`` (each layer's statistics from the layers
before it as already compressed) instead of the dense model's.

Protocol: calibration = 32 random windows × 512 tokens of enwiki/calib (seed 0); every method's statistics come
from the dense model in one hooked pass; evaluation = the first 40 windows × 512 tokens of enwiki/test (20,440
predicted tokens). ``params`` counts decoder linear weights only (embeddings and LM head excluded; a factored
linear counts both factors); KV bytes per token are for an fp32 cache. ``seconds`` is the method's own time
(statistics not shared with other rows + decomposition + for A³ global the sensitivity probes), not evaluation.
A perplexity that overflows (or a non-finite loss) is printed as "diverged".

Families with per-head q/k norms (Gemma 3, Qwen3): ``a3`` gives one row per ``--qk-norm`` mode
(:mod:`a3q.stages.a3.qk_norm`). ``keep`` leaves QK whole, so at equal size it removes more of OV and MLP: their
ratio is raised to ``target × all / (OV + MLP)`` weights so the achieved ratio is the target's. ``a3_global`` uses
``pre_norm`` there (its QK probes compute the norms over the kept coordinates, as the compressed model does).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine_info, machine_line

ALL = ("qk", "ov", "mlp")
METHODS = ("dense", "svd", "asvd", "svd_llm", "a3", "a3_sequential", "a3_global", "ablations")
LABELS = {"dense": "dense", "svd": "SVD", "asvd": "ASVD (α=0.5)", "svd_llm": "SVD-LLM (whitening)",
          "a3": "A³ uniform", "a3_sequential": "A³ uniform, sequential statistics", "a3_global": "A³ global",
          "ablations": "A³ ablation", "a3_keep": "A³ uniform, qk_norm: keep",
          "a3_pre_norm": "A³ uniform, qk_norm: pre_norm", "a3_post_norm": "A³ uniform, qk_norm: post_norm"}
ROW_ORDER = METHODS[:5] + ("a3_keep", "a3_pre_norm", "a3_post_norm") + METHODS[5:]
# "ablations": A³ with one component at 10%, and at 20% with ranks rounded to multiples of 8 / 32
ABLATIONS = [(f"{c} only", {c: 0.1}, 0.1, 1) for c in ALL] + [(f"ranks ×{m}", {c: 0.2 for c in ALL}, 0.2, m) for m in (8, 32)]


def safe_perplexity(model, windows) -> float:
    """Perplexity, or inf when the model's loss is not finite (plain SVD at high ratios)."""
    from a3q.metrics.perplexity import NonFiniteLossError, perplexity

    try:
        return perplexity(model, windows, progress=False).perplexity
    except (NonFiniteLossError, OverflowError):
        return math.inf


def baseline_rows(dense, calib, test, ratios, methods, emit) -> None:
    from a3q.stages.baselines.asvd import ASVDConfig, asvd_factors
    from a3q.stages.baselines.common import collect_input_statistics, factorize_model
    from a3q.stages.baselines.svd import SVDConfig, svd_factors
    from a3q.stages.baselines.svd_llm import SVDLLMConfig, svd_llm_factors

    factorizers = {"svd": (SVDConfig, svd_factors), "asvd": (ASVDConfig, partial(asvd_factors, alpha=0.5)),
                   "svd_llm": (SVDLLMConfig, partial(svd_llm_factors, damping=1e-6))}
    started = time.perf_counter()
    stats = collect_input_statistics(dense, calib, second_moments="svd_llm" in methods, progress=False)
    stats_seconds = time.perf_counter() - started
    caches: dict[str, dict] = {}  # full-rank factors per method: truncating them serves every ratio
    for ratio in ratios:
        for method in [m for m in ("svd", "asvd", "svd_llm") if m in methods]:
            config_class, factorize = factorizers[method]
            started = time.perf_counter()
            factored = factorize_model(dense, config_class(ratio=ratio), factorize, stats if method != "svd" else None,
                                       caches.setdefault(method, {}))
            seconds = time.perf_counter() - started + (stats_seconds if method != "svd" else 0.0)
            ranks = factored.layers[0].factor_ranks
            emit(row(method, ratio, dense, factored, safe_perplexity(factored.model, test), seconds,
                     f"k: q {ranks['q']}, k {ranks['k']}, up {ranks['up']}"))
            del factored


def a3_rows(dense, calib, test, ratios, methods, args, emit) -> None:
    from a3q.stages.a3.apply import as_a3_graph, compress_model
    from a3q.stages.a3.ranks import plan_ranks
    from a3q.stages.a3.statistics import collect_statistics

    graph = as_a3_graph(dense)
    started = time.perf_counter()
    stats = collect_statistics(graph, calib, set(ALL), progress=False)
    stats_seconds = time.perf_counter() - started
    if "ablations" in methods:
        for label, component_ratios, target, multiple in ABLATIONS:
            plans = plan_ranks(graph.layers, component_ratios, {}, multiple, rope=True)
            started = time.perf_counter()
            compressed, _ = compress_model(graph, stats, plans, 1e-6, frozenset(component_ratios), progress=False)
            emit(row("ablations", target, dense, compressed, safe_perplexity(compressed.model, test),
                     time.perf_counter() - started + stats_seconds,
                     f"{label}: q/k {plans[0].qk}, v/o {plans[0].vo}, ff {plans[0].ff}"))
            del compressed
    sensitivity: dict = {}  # with --probe-ratio: one set of probes serves every ratio
    if qk_normed(graph):
        for ratio in ratios:
            if "a3" in methods:
                qk_norm_rows(graph, stats, stats_seconds, dense, test, ratio, args.qk_norm, emit)
        methods = [m for m in methods if m != "a3"]  # done above, one row per q/k-norm mode
    for ratio in ratios:
        if "a3_sequential" in methods:  # through the stage itself: each layer's statistics after the ones before
            import copy

            from a3q.engine import apply_stage

            started = time.perf_counter()
            compressed, metrics = apply_stage(copy.deepcopy(graph), "a3", windows=calib, ratio=ratio,
                                              statistics="sequential")
            emit(row("a3_sequential", ratio, dense, compressed, safe_perplexity(compressed.model, test),
                     time.perf_counter() - started, metrics["note"]))
            del compressed
        for method in [m for m in ("a3", "a3_global") if m in methods]:
            started = time.perf_counter()
            if method == "a3":
                plans = plan_ranks(graph.layers, {c: ratio for c in ALL}, {}, 1, rope=True)
                extra = ""
            else:
                from a3q.stages.a3.allocation import plan_global_ranks
                from a3q.stages.a3.apply import qk_norm_setting

                qk_norm = qk_norm_setting(graph, "pre_norm")
                probes = calib[: args.probe_windows, : args.probe_seq_len]
                if args.probe_ratio is not None and "shared" not in sensitivity:
                    sensitivity["shared"] = plan_global_ranks(
                        graph, stats, {c: args.probe_ratio for c in ALL}, probes, 1, 1e-6, args.max_shift, args.mix_components,
                        progress=False, qk_norm=qk_norm
                    ).sensitivity
                allocation = plan_global_ranks(
                    graph, stats, {c: ratio for c in ALL}, probes, multiple=1, damping=1e-6, max_shift=args.max_shift,
                    mix_components=args.mix_components, progress=False, sensitivity=sensitivity.get("shared"),
                    qk_norm=qk_norm,
                )
                plans = allocation.plans
                extra = allocation.summary()
            compressed, _ = compress_model(graph, stats, plans, 1e-6, frozenset(ALL), progress=False)
            seconds = time.perf_counter() - started + stats_seconds
            note = (f"q/k {plans[0].qk}, v/o {plans[0].vo}, ff {plans[0].ff}" if method == "a3" else extra)
            result = row(method, ratio, dense, compressed, safe_perplexity(compressed.model, test), seconds, note)
            if method == "a3_global":
                result["plans"] = [vars(p) for p in plans]
                result["sensitivity"] = allocation.sensitivity
            emit(result)
            del compressed


def qk_normed(graph) -> bool:
    from a3q.arch import FAMILIES

    return FAMILIES[graph.family].qk_norm_paths is not None


def qk_norm_rows(graph, stats, stats_seconds, dense, test, ratio, modes, emit) -> None:
    """A³ uniform at ``ratio`` once per q/k-norm mode; ``keep`` takes QK's share of the budget from OV and MLP."""
    from a3q.stages.a3.apply import compress_model
    from a3q.stages.a3.ranks import plan_ranks

    for mode in modes:
        started = time.perf_counter()
        if mode == "keep":
            shapes = graph.layers[0].linear_shapes(graph.hidden_size)
            every = sum(i * o for i, o in shapes.values())
            qk = sum(i * o for name, (i, o) in shapes.items() if name in ("q", "k"))
            raised = ratio * every / (every - qk)
            plans = plan_ranks(graph.layers, {"qk": None, "ov": raised, "mlp": raised}, {}, 1, rope=True)
            components = frozenset({"ov", "mlp"})
        else:
            plans = plan_ranks(graph.layers, {c: ratio for c in ALL}, {}, 1, rope=True)
            components = frozenset(ALL)
        compressed, _ = compress_model(graph, stats, plans, 1e-6, components, progress=False, qk_norm=mode)
        emit(row(f"a3_{mode}", ratio, dense, compressed, safe_perplexity(compressed.model, test),
                 time.perf_counter() - started + stats_seconds,
                 f"q/k {plans[0].qk}, v/o {plans[0].vo}, ff {plans[0].ff}"))
        del compressed


def row(method, target, dense, graph, ppl, seconds, note) -> dict:
    params = graph.decoder_linear_params()
    return dict(method=method, target=target, ratio=1 - params / dense.decoder_linear_params(), ppl=ppl,
                params=params, kv_bytes_per_token=graph.kv_bytes_per_token(), seconds=seconds, note=note)


def format_ppl(ppl: float) -> str:
    if not math.isfinite(ppl) or ppl > 1e6:
        return "diverged" if not math.isfinite(ppl) else f"{ppl:.2e}"
    return f"{ppl:.2f}"


def print_table(results: list[dict]) -> None:
    rows = [r for result in results for r in result["rows"]]
    dense = next(r for r in rows if r["method"] == "dense")
    order = {m: i for i, m in enumerate(ROW_ORDER)}
    rows.sort(key=lambda r: (r["method"] == "ablations", r["target"], order[r["method"]]))
    first = results[0]
    table = Table(title=f"{first.get('model', 'smollm2-135m')}, enwiki/test {first['eval_windows']}×{first['seq_len']}, "
                  f"calibration {first['calib_windows']}×{first['seq_len']} enwiki/calib")
    for column in ["target", "method", "achieved ratio", "ppl", "× dense", "params (M)", "KV B/token", "seconds", "ranks"]:
        table.add_column(column, justify="left" if column in ("method", "ranks") else "right")
    for r in rows:
        times = r["ppl"] / dense["ppl"] if math.isfinite(r["ppl"]) else math.inf
        table.add_row(f"{r['target']:.0%}", LABELS[r["method"]], f"{r['ratio']:.3f}", format_ppl(r["ppl"]),
                      format_ppl(times), f"{r['params'] / 1e6:.2f}", f"{r['kv_bytes_per_token']:,.0f}",
                      f"{r['seconds']:.1f}", r["note"])
    console = Console(width=200)
    console.print(table)
    for result in results:
        measured = sorted({r["method"] for r in result["rows"]}, key=ROW_ORDER.index)
        console.print(f"{', '.join(measured)}: {machine_line(result['machine'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model alias, folder or Hub id")
    parser.add_argument("--qk-norm", nargs="+", choices=("keep", "pre_norm", "post_norm"),
                        default=["keep", "pre_norm", "post_norm"], help="q/k-norm families: the modes to measure")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--probe-windows", type=int, default=2, help="A³ global: calibration windows per probe")
    parser.add_argument("--probe-seq-len", type=int, default=256, help="A³ global: tokens per probe window")
    parser.add_argument("--probe-ratio", type=float, default=None,
                        help="A³ global: probe once at this ratio for all ratios (default: probe at each ratio, as the stage does)")
    parser.add_argument("--max-shift", type=float, default=0.1, help="A³ global: largest per-layer shift of a component's kept fraction")
    parser.add_argument("--mix-components", action="store_true", help="A³ global: also move budget between qk/ov/mlp")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on an oversubscribed machine)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--table", type=Path, nargs="+", default=None, help="only print the table of these JSON files")
    args = parser.parse_args()
    if args.table:
        print_table([json.loads(path.read_text()) for path in args.table])
        return

    import torch

    from a3q.calib.sources import enwiki

    from a3q.calib.windows import random_windows, sequential_windows
    from a3q.io.loading import load_graph

    torch.set_num_threads(args.threads)

    console = Console(stderr=True)
    info = machine_info("cpu")
    dense = load_graph(args.model)
    calib = random_windows(dense.tokenizer, enwiki("calib"), args.seq_len, args.calib_windows, seed=0)
    test = sequential_windows(dense.tokenizer, enwiki("test"), args.seq_len, args.eval_windows)
    result = dict(machine=info, model=args.model, methods=args.methods, calib_windows=args.calib_windows, eval_windows=args.eval_windows,
                  seq_len=args.seq_len, probe=dict(windows=args.probe_windows, seq_len=args.probe_seq_len,
                                                   max_shift=args.max_shift, mix_components=args.mix_components, ratio=args.probe_ratio), rows=[])

    def emit(new_row: dict) -> None:
        """Keep and log a row, and rewrite the JSON so an interrupted run keeps what it measured."""
        result["rows"].append(new_row)
        console.log({k: v for k, v in new_row.items() if k != "plans"})
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2, default=str))

    if "dense" in args.methods:
        first = dense.layers[0]
        emit(row("dense", 0.0, dense, dense, safe_perplexity(dense.model, test), 0.0,
                 f"q/k {first.qk_head_dim}, v/o {first.vo_head_dim}, ff {first.intermediate_size}"))
    if any(m in args.methods for m in ("svd", "asvd", "svd_llm")):
        baseline_rows(dense, calib, test, args.ratios, args.methods, emit)
    if any(m in args.methods for m in ("a3", "a3_sequential", "a3_global", "ablations")):
        a3_rows(dense, calib, test, args.ratios, args.methods, args, emit)
    if "dense" in args.methods:
        print_table([result])


if __name__ == "__main__":
    main()
