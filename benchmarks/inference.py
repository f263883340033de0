"""Prefill and decode throughput, dense vs A³-compressed, with the head dims each configuration gets.

Why: A³ removes parameters *and* shrinks the KV cache without adding matmuls, so it should speed up
both phases; but it also makes head dims odd (e.g. 50/51 instead of 64), which attention kernels may
handle poorly. ``--rank-multiple`` rounds ranks down to multiples of 8 or 32 to test exactly that, and
every row reports the resulting qk/vo head dims and intermediate size.

Timing: greedy decoding with the KV cache in a manual loop (the same forwards ``generate`` runs with
``min_new_tokens = max_new_tokens = N``: one prefill that yields the first new token, then N-1 one-token
steps), so prefill and decode are timed separately. Warm-up first, then the median of ``--repeats``.

Commands (from the repository root):

    # default: real SmolLM2-135M on CPU (float32), batch 1, prefill 512, 64 new tokens, dense vs A³ 20%
    A3Q_CACHE_DIR=.cache HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference.py
    A3Q_CACHE_DIR=.cache HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference.py --rank-multiple 8
    # on a SHARED machine: 2 OpenMP threads fighting another process made decode steps 4-10x slower
    A3Q_CACHE_DIR=.cache HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference.py --threads 1 --rank-multiple 8
    A3Q_CACHE_DIR=.cache HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference.py --rank-multiple 1 8 32
    # GPU: LLaMA-3.1-8B shape, random bf16 weights, batch 8 × 2048 prefill, SDPA
    A3Q_CACHE_DIR=.cache HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inference.py \
        --device cuda --shape llama-3.1-8b --rank-multiple 1 8 32 --json out/inference_8b.json

For SmolLM2 the compressed rows are real A³ (statistics from ``--calib-windows`` enwiki/calib windows,
collected once and shared by every rank multiple). For the 8B shape they are A3Llama models built
directly at the planned per-layer dims with random weights: timing shapes, not quality results.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=common.SHAPES, default="smollm2")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), help="default float32 SmolLM2/CPU, else bfloat16")
    parser.add_argument("--batch", type=int, help="sequences per batch (default 1 SmolLM2, 8 for the 8B shape)")
    parser.add_argument("--prefill", type=int, help="prompt tokens per sequence (default 512 SmolLM2, 2048 8B)")
    parser.add_argument("--decode", type=int, default=64, help="new tokens per sequence, greedy (≥ 2)")
    parser.add_argument("--ratio", type=float, default=0.2, help="fraction A³ removes from qk, ov and mlp")
    parser.add_argument("--rank-multiple", type=int, nargs="+", default=[1], help="one A³ row per value, e.g. 1 8 32")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--calib-windows", type=int, default=8, help="SmolLM2: A³ calibration windows")
    parser.add_argument("--calib-seq-len", type=int, default=512, help="SmolLM2: tokens per calibration window")
    parser.add_argument("--layers", type=int, help="8B shape: build only N layers (reduced: not 8B numbers)")
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
    if args.decode < 2 or args.repeats < 1:
        parser.error("--decode must be ≥ 2 and --repeats ≥ 1")
    big = args.shape == "llama-3.1-8b"
    args.batch = args.batch or (8 if big else 1)
    args.prefill = args.prefill or (2048 if big else 512)
    args.dtype = args.dtype or common.default_dtype(args.device, args.shape)
    return args


@torch.no_grad()
def generate_once(model: Any, prompt: torch.Tensor, new_tokens: int, device: str) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy generation of ``new_tokens`` with the KV cache."""
    common.synchronize(device)
    started = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    common.synchronize(device)
    prefilled = time.perf_counter()
    cache = out.past_key_values
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    common.synchronize(device)
    return prefilled - started, time.perf_counter() - prefilled


def measure(model: Any, prompt: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Warm up, then the median prefill/decode time over ``--repeats`` and the resulting tokens/s."""
    for _ in range(args.warmup):
        generate_once(model, prompt, args.decode, args.device)
    cpu_started, started = time.process_time(), time.perf_counter()
    runs = [generate_once(model, prompt, args.decode, args.device) for _ in range(args.repeats)]
    cpu_s, wall_s = time.process_time() - cpu_started, time.perf_counter() - started
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    batch, length = prompt.shape
    return {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_tokens_per_s": batch * length / prefill_s,
        "decode_tokens_per_s": batch * (args.decode - 1) / decode_s,
        # CPU seconds / (wall × torch threads) over the timed repeats: a hint of core sharing on CPU
        "cpu_utilisation": cpu_s / (wall_s * torch.get_num_threads()),
    }


def span(values: list[int]) -> int | str:
    """One number when every layer agrees, else 'min–max'."""
    return values[0] if min(values) == max(values) else f"{min(values)}–{max(values)}"


def describe_row(graph: Any) -> dict[str, Any]:
    """Shapes that matter to kernels and memory, read from the ModelGraph."""
    return {
        "qk_head_dim": span([layer.qk_head_dim for layer in graph.layers]),
        "vo_head_dim": span([layer.vo_head_dim for layer in graph.layers]),
        "intermediate_size": span([layer.intermediate_size for layer in graph.layers]),
        "decoder_linear_params": graph.decoder_linear_params(),
        "kv_bytes_per_token": graph.kv_bytes_per_token(),
        "attn_implementation": graph.model.config._attn_implementation,
    }


def smollm2_models(args: argparse.Namespace) -> tuple[torch.Tensor, Iterator[tuple[str, int | None, Any]], list[str]]:
    """Prompt, then (label, rank multiple, graph) for dense SmolLM2 and its real A³ compressions."""
    from a3q.calib.sources import enwiki
    from a3q.calib.windows import random_windows, sequential_windows
    from a3q.io.loading import load_graph
    from a3q.stages.a3.apply import as_a3_graph, compress_model
    from a3q.stages.a3.ranks import plan_ranks
    from a3q.stages.a3.statistics import collect_statistics

    dense = load_graph(common.SMOLLM2_ALIAS, dtype=args.dtype)
    dense.model.to(args.device)
    prompt = sequential_windows(dense.tokenizer, enwiki("test"), args.prefill, args.batch)
    if prompt.shape[0] < args.batch:
        raise ValueError(f"enwiki/test has only {prompt.shape[0]} windows of {args.prefill} tokens")
    calib = random_windows(dense.tokenizer, enwiki("calib"), args.calib_seq_len, args.calib_windows, args.seed)
    notes = [(f"real SmolLM2-135M-Instruct, {args.dtype}; prompts: enwiki/test; A³ calibrated on "
              f"{args.calib_windows}×{args.calib_seq_len} enwiki/calib tokens")]

    def rows() -> Iterator[tuple[str, int | None, Any]]:
        yield "dense (HF LlamaForCausalLM)", None, dense
        a3_graph = as_a3_graph(dense)
        stats = collect_statistics(a3_graph, calib.to(args.device), {"qk", "ov", "mlp"}, 4, progress=False)
        ratios = {c: args.ratio for c in ("qk", "ov", "mlp")}
        for multiple in args.rank_multiple:
            plans = plan_ranks(a3_graph.layers, ratios, {}, multiple, a3_graph.uses_rope)
            compressed, _ = compress_model(a3_graph, stats, plans, 1e-6, progress=False)
            yield f"A³ ρ={args.ratio:g}, rank multiple {multiple}", multiple, compressed
            del compressed  # never hold two compressed models at once

    return prompt.to(args.device), rows(), notes


def llama8b_models(args: argparse.Namespace) -> tuple[torch.Tensor, Iterator[tuple[str, int | None, Any]], list[str]]:
    """Prompt, then (label, rank multiple, graph): random dense 8B shape and A3Llama at the planned dims."""
    from transformers import LlamaForCausalLM

    from a3q.arch import describe, layers_from_config
    from a3q.arch.auto import A3LlamaForCausalLM, a3_config_from_dense
    from a3q.stages.a3.ranks import plan_ranks

    dtype = common.DTYPES[args.dtype]
    config = common.llama31_8b_config(args.layers, args.hidden_size, args.vocab_size)
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prefill), generator=generator)
    notes = [common.RANDOM_WEIGHTS_NOTE + f"; {args.dtype}; random prompt token ids"]
    if common.is_reduced(config):
        notes.append(f"REDUCED shape (layers {config.num_hidden_layers}, hidden {config.hidden_size}, vocab "
                     f"{config.vocab_size}): these are not LLaMA-3.1-8B throughputs")

    def rows() -> Iterator[tuple[str, int | None, Any]]:
        torch.manual_seed(args.seed)
        yield "dense (HF LlamaForCausalLM)", None, describe(
            common.random_model(LlamaForCausalLM, config, args.device, dtype), None, "random 8B shape")
        _, _, layers = layers_from_config(config)
        ratios = {c: args.ratio for c in ("qk", "ov", "mlp")}
        for multiple in args.rank_multiple:
            plans = plan_ranks(layers, ratios, {}, multiple, True)
            a3_config = a3_config_from_dense(
                config,
                qk_head_dims=[p.qk for p in plans],
                vo_head_dims=[p.vo for p in plans],
                intermediate_sizes=[p.ff for p in plans],
                # which RoPE pairs are kept does not change the cost; the gather path is what A³ models run
                rope_pairs=[[list(range(p.qk // 2))] * config.num_key_value_heads for p in plans],
            )
            model = common.random_model(A3LlamaForCausalLM, a3_config, args.device, dtype)
            yield f"A³ ρ={args.ratio:g}, rank multiple {multiple}", multiple, describe(model, None, "random 8B shape")
            del model  # never hold two 8B-shape models at once

    return prompt.to(args.device), rows(), notes


def render(result: dict[str, Any]) -> None:
    """Print the machine line, the table and the notes."""
    from rich.console import Console
    from rich.table import Table

    settings = result["settings"]
    console = Console(width=200)
    console.print(common.machine_line(result["machine"]))
    table = Table(title=f"{settings['shape']} inference on {settings['device']} ({settings['dtype']}): batch "
                        f"{settings['batch']}, prefill {settings['prefill']}, {settings['decode']} new tokens greedy, "
                        f"median of {settings['repeats']}")
    on_cpu = not settings["device"].startswith("cuda")
    for column in ("model", "qk dim", "vo dim", "ff dim", "decoder linear params", "KV B/token",
                   "prefill tok/s", "decode tok/s", "prefill ×", "decode ×") + (("CPU util",) if on_cpu else ()):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in result["rows"]:
        table.add_row(
            row["label"], str(row["qk_head_dim"]), str(row["vo_head_dim"]), str(row["intermediate_size"]),
            f"{row['decoder_linear_params'] / 1e6:.2f} M", f"{row['kv_bytes_per_token']:,.0f}",
            f"{row['prefill_tokens_per_s']:,.1f}", f"{row['decode_tokens_per_s']:,.2f}",
            f"{row['prefill_speedup']:.2f}", f"{row['decode_speedup']:.2f}",
            *((f"{row['cpu_utilisation']:.0%}",) if on_cpu else ()),
        )
    console.print(table)
    for note in result["notes"]:
        console.print(f"• {note}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and optionally writes) the JSON-able result."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = common.machine_info(args.device)  # load average at the start, before we add our own
    build = smollm2_models if args.shape == "smollm2" else llama8b_models
    prompt, models, notes = build(args)
    rows: list[dict[str, Any]] = []
    for label, multiple, graph in models:
        row = {"label": label, "rank_multiple": multiple, **describe_row(graph), **measure(graph.model, prompt, args)}
        if rows:  # speedups are relative to the dense row, always the first
            row["prefill_speedup"] = row["prefill_tokens_per_s"] / rows[0]["prefill_tokens_per_s"]
            row["decode_speedup"] = row["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
        else:
            row["prefill_speedup"] = row["decode_speedup"] = 1.0
        rows.append(row)
        del graph  # free this model before the next one is built (SmolLM2's dense stays in the generator)
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    notes.append(f"attention: {rows[0]['attn_implementation']}; decode tok/s counts the {args.decode - 1} one-token "
                 "steps after the prefill (which yields the first new token); KV B/token in the model dtype")
    if not args.device.startswith("cuda"):
        notes.append(f"CPU util = process CPU time / (wall × {torch.get_num_threads()} threads) over the timed "
                     f"repeats (low: shared cores or single-threaded steps); load avg (1 min) at end "
                     f"{os.getloadavg()[0]:.2f}")
    return common.finish("inference", machine, args, rows, notes, render)


if __name__ == "__main__":
    main()
