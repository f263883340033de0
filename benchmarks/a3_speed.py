"""How long does the A³ pass take? Calibration statistics + closed-form decomposition, timed.

Why: the paper (arXiv 2505.12942) reports 1.1 h to compress LLaMA-3.1-8B on one H100. a3q computes
the same optimum from d×d head-space statistics (see /work/shared/A3-MATH.md), which should be far
cheaper; this script measures it. It times exactly what the ``a3`` stage times (``collect_statistics``
then ``compress_model``); the dense → a3q-class conversion before them is reported separately.

Commands (from the repository root):

    # default: real SmolLM2-135M on CPU, 32×512 enwiki/calib tokens, ratio 0.2 (target ≤ 120 s on 2 cores)
    A3Q_CACHE_DIR=.cache HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/a3_speed.py
    # on a SHARED machine: 2 OpenMP threads fighting another process made small LAPACK calls 15-25x slower
    A3Q_CACHE_DIR=.cache HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/a3_speed.py --threads 1
    # CPU check of the 8B code path: one layer, extrapolated linearly to 32
    A3Q_CACHE_DIR=.cache HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/a3_speed.py \
        --shape llama-3.1-8b --layers 1 --windows 2 --seq-len 256
    # the paper's setting on a GPU: LLaMA-3.1-8B shape (random bf16 weights), 128×2048 random tokens
    A3Q_CACHE_DIR=.cache HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/a3_speed.py \
        --device cuda --shape llama-3.1-8b --json out/a3_speed_8b.json

Peak memory: CPU = peak RSS (VmHWM, reset just before the pass, so it includes the resident model);
GPU = ``torch.cuda.max_memory_allocated`` over the pass.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common

PAPER_8B_H100_S = 1.1 * 3600  # the paper's LLaMA-3.1-8B A³ time on one H100, 128×2048 calibration tokens
PAPER_TOKENS = 128 * 2048
SMOLLM2_TARGET_S = 120.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=common.SHAPES, default="smollm2")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--windows", type=int, help="calibration windows (default 32 SmolLM2, 128 8B)")
    parser.add_argument("--seq-len", type=int, help="tokens per window (default 512 SmolLM2, 2048 8B)")
    parser.add_argument("--ratio", type=float, default=0.2, help="fraction removed from qk, ov and mlp")
    parser.add_argument("--rank-multiple", type=int, default=1)
    parser.add_argument("--damping", type=float, default=1e-6)
    parser.add_argument("--batch-size", type=int, default=4, help="calibration windows per forward")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), help="default float32 SmolLM2/CPU, else bfloat16")
    parser.add_argument("--layers", type=int, help="8B shape: build only N layers, extrapolate linearly to 32")
    parser.add_argument("--hidden-size", type=int, help="8B shape: narrower model (multiple of 128), for tests")
    parser.add_argument("--vocab-size", type=int, help="8B shape: smaller vocabulary, for tests")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, = cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.shape == "smollm2" and any(v is not None for v in (args.layers, args.hidden_size, args.vocab_size)):
        parser.error("--layers/--hidden-size/--vocab-size apply to --shape llama-3.1-8b only")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    big = args.shape == "llama-3.1-8b"
    args.windows = args.windows or (128 if big else 32)
    args.seq_len = args.seq_len or (2048 if big else 512)
    args.dtype = args.dtype or common.default_dtype(args.device, args.shape)
    return args


def build(args: argparse.Namespace) -> tuple[Any, torch.Tensor, int, list[str]]:
    """(dense graph on the device, calibration windows on the device, full layer count, notes)."""
    from a3q.arch import describe

    dtype = common.DTYPES[args.dtype]
    if args.shape == "smollm2":
        from a3q.calib.sources import enwiki
        from a3q.calib.windows import random_windows
        from a3q.io.loading import load_graph

        graph = load_graph(common.SMOLLM2_ALIAS, dtype=args.dtype)
        graph.model.to(args.device)
        windows = random_windows(graph.tokenizer, enwiki("calib"), args.seq_len, args.windows, args.seed)
        notes = [f"real SmolLM2-135M-Instruct, {args.dtype}, enwiki/calib windows (seed {args.seed})"]
        return graph, windows.to(args.device), len(graph.layers), notes
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = common.llama31_8b_config(args.layers, args.hidden_size, args.vocab_size)
    model = common.random_model(LlamaForCausalLM, config, args.device, dtype)
    graph = describe(model, tokenizer=None, source="random llama-3.1-8b shape")
    generator = torch.Generator().manual_seed(args.seed)
    windows = torch.randint(0, config.vocab_size, (args.windows, args.seq_len), generator=generator)
    notes = [common.RANDOM_WEIGHTS_NOTE + f"; {args.dtype}; calibration on uniformly random token ids"]
    if args.hidden_size or args.vocab_size:
        notes.append(
            f"REDUCED width: hidden {config.hidden_size}, heads {config.num_attention_heads}/"
            f"{config.num_key_value_heads}, vocab {config.vocab_size}: not comparable with the paper"
        )
    return graph, windows.to(args.device), common.LLAMA31_8B["num_hidden_layers"], notes


def run_pass(args: argparse.Namespace, graph: Any, windows: torch.Tensor) -> dict[str, Any]:
    """Convert, then time statistics and decomposition exactly as the a3 stage chains them."""
    from a3q.stages.a3.apply import as_a3_graph, compress_model
    from a3q.stages.a3.ranks import plan_ranks
    from a3q.stages.a3.statistics import collect_statistics

    device = args.device
    common.synchronize(device)
    started = time.perf_counter()
    a3_graph = as_a3_graph(graph)
    common.synchronize(device)
    convert_s = time.perf_counter() - started
    if a3_graph is not graph:
        graph.model = None  # drop the dense copy: only the a3q-class model is needed from here on
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    ratios = {component: args.ratio for component in ("qk", "ov", "mlp")}
    plans = plan_ranks(a3_graph.layers, ratios, {}, args.rank_multiple, a3_graph.uses_rope)
    peak_reset = common.reset_peak_memory(device)
    common.synchronize(device)
    cpu_started, started = time.process_time(), time.perf_counter()
    stats = collect_statistics(a3_graph, windows, {"qk", "ov", "mlp"}, args.batch_size, progress=False)
    common.synchronize(device)
    calibrated = time.perf_counter()
    compressed, _ = compress_model(a3_graph, stats, plans, args.damping, progress=False)
    common.synchronize(device)
    finished = time.perf_counter()
    cpu_s = time.process_time() - cpu_started
    peak = common.peak_memory_bytes(device)
    return {
        "convert_s": convert_s,
        "calibration_s": calibrated - started,
        "decomposition_s": finished - calibrated,
        "total_s": finished - started,
        # CPU seconds of this process over the pass / (wall × torch threads): well below 1 on CPU means
        # the cores were shared (or idle in single-threaded code); a contention hint, not a measurement
        "cpu_utilisation": cpu_s / ((finished - started) * torch.get_num_threads()),
        "peak_memory_bytes": peak,
        "peak_memory_scope": ("pass" if peak_reset else "process") + (" (GPU allocated)" if device.startswith("cuda") else " (RSS)"),
        "calibration_tokens": int(windows.numel()),
        "achieved_ratio": 1 - compressed.decoder_linear_params() / a3_graph.decoder_linear_params(),
        "ranks": {"qk": plans[0].qk, "vo": plans[0].vo, "ff": plans[0].ff},
    }


def make_rows(args: argparse.Namespace, measured: dict[str, Any], built: int, full: int) -> list[dict[str, Any]]:
    """The measured row, plus a linear extrapolation to the full depth when fewer layers were built."""
    label = "SmolLM2-135M" if args.shape == "smollm2" else "LLaMA-3.1-8B shape"
    rows = [dict(measured, label=f"{label}, measured ({built}/{full} layers)", layers=built, extrapolated=False)]
    if built < full:
        scale = full / built
        extrapolated = {k: measured[k] * scale for k in ("calibration_s", "decomposition_s", "total_s", "convert_s")}
        rows.append(
            dict(measured, **extrapolated, label=f"{label}, extrapolated ×{scale:g} (linear)", layers=full,
                 extrapolated=True, peak_memory_bytes=None)
        )
    for row in rows:
        row["paper_total_s"] = PAPER_8B_H100_S if args.shape == "llama-3.1-8b" else None
    return rows


def render(result: dict[str, Any]) -> None:
    """Print the machine line, the table and the notes."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    console.print(common.machine_line(result["machine"]))
    table = Table(title=f"A³ pass (ratio {result['settings']['ratio']}, rank multiple {result['settings']['rank_multiple']})")
    show_paper = result["settings"]["shape"] == "llama-3.1-8b"
    for column in ("run", "device", "calib tokens", "calibration s", "decomposition s", "A³ total s",
                   "peak mem GiB", "achieved ρ", "ranks qk/vo/ff"):
        table.add_column(column, justify="left" if column in ("run", "device") else "right")
    if show_paper:
        table.add_column("paper: 8B on 1×H100", justify="right")
    for row in result["rows"]:
        peak = "—" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / 2**30:.2f}"
        ranks = row["ranks"]
        cells = [row["label"], result["machine"].get("gpu") or result["settings"]["device"],
                 f"{row['calibration_tokens']:,}", f"{row['calibration_s']:.1f}", f"{row['decomposition_s']:.1f}",
                 f"{row['total_s']:.1f}", peak, f"{row['achieved_ratio']:.3f}", f"{ranks['qk']}/{ranks['vo']}/{ranks['ff']}"]
        if show_paper:
            cells.append(f"1.1 h ({PAPER_8B_H100_S:.0f} s)")
        table.add_row(*cells)
    console.print(table)
    for note in result["notes"]:
        console.print(f"• {note}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and optionally writes) the JSON-able result."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = common.machine_info(args.device)  # load average at the start, before we add our own
    graph, windows, full_layers, notes = build(args)
    built_layers = len(graph.layers)
    measured = run_pass(args, graph, windows)
    rows = make_rows(args, measured, built_layers, full_layers)
    notes.append(
        f"dense → a3q-class conversion (not in the total, as in the a3 stage): {measured['convert_s']:.1f} s; "
        f"peak memory scope: {measured['peak_memory_scope']}"
    )
    if built_layers < full_layers:
        notes.append(
            "extrapolated row = measured × full/built layers; it slightly overstates the per-model part "
            "(embeddings, lm_head), which does not grow with depth"
        )
    if args.shape == "llama-3.1-8b" and measured["calibration_tokens"] != PAPER_TOKENS:
        notes.append(f"the paper calibrated on {PAPER_TOKENS:,} tokens (128×2048); this run used "
                     f"{measured['calibration_tokens']:,}: calibration time scales about linearly with tokens")
    if args.shape == "llama-3.1-8b" and not args.device.startswith("cuda"):
        notes.append("paper column is an H100 time; this run is on CPU, so the two are not comparable")
    if args.shape == "smollm2" and (args.windows, args.seq_len) == (32, 512):
        verdict = "met" if rows[0]["total_s"] <= SMOLLM2_TARGET_S else "NOT met"
        notes.append(f"target: whole A³ pass ≤ {SMOLLM2_TARGET_S:.0f} s on 2 CPU cores: {verdict}")
    if not args.device.startswith("cuda"):
        notes.append(f"CPU utilisation over the pass: {measured['cpu_utilisation']:.0%} of wall × "
                     f"{torch.get_num_threads()} threads; load avg (1 min) at end {os.getloadavg()[0]:.2f}")
    return common.finish("a3_speed", machine, args, rows, notes, render)


if __name__ == "__main__":
    main()
