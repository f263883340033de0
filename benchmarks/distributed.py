"""Data-parallel calibration: SmolLM2, A³ 20% + GPTQ 4-bit g64 in one pass, 1 vs 2 processes (1 thread each).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distributed.py --windows 8 --seq-len 256 --json out/bench/distributed.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distributed.py --windows 8 --seq-len 128 --gptq-attention-only \
        --batch-size 2    # the agreement of the two artifacts at another batch size

Each row is a real ``a3q run RECIPE --nproc N`` (gloo, ``OMP_NUM_THREADS=1`` per process; wall time includes
start-up, loading and the export). Checkpoints are off in both rows (``checkpoint_every: 0``), so neither row is
slowed by them. "reduced / layer" is what every rank sends into its all-reduces per layer (the report's
``distributed.bytes_reduced`` over the layers): A³'s head-space sums and GPTQ's Hessian sums in float64, plus the
token counts.

The second table is computed on paper for Llama-3.1-8B and -70B shapes: the float64 bytes per layer that A³ (all
components, GQA) and GPTQ (every linear, dense shapes) reduce. A³'s statistics are d×d per head and tiny; GPTQ's are
``in × in`` per input group, dominated by ``down_proj``'s ``d_ff × d_ff`` (smaller after A³ shrinks d_ff).
``--gptq-attention-only`` skips the MLP linears in GPTQ (shorter; then down_proj's Hessian is not reduced).
``--batch-size`` sets both stages' batch size (default 4). The two-process row also says how far its artifact is from
the one-process one: the share of equal GPTQ codes and the relative difference of the logits on 2 × 128 test tokens.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (add_a3_gptq_arguments, finish, machine_info, print_with_context,  # noqa: E402
                          run_a3q, write_a3_gptq_recipe)

LAYERS = 30
SHAPES = {  # config.json of meta-llama/Llama-3.1-8B and -70B
    "Llama-3.1-8B": {"hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128, "ff": 14336, "layers": 32},
    "Llama-3.1-70B": {"hidden": 8192, "heads": 64, "kv_heads": 8, "head_dim": 128, "ff": 28672, "layers": 80},
}


def paper_bytes(shape: dict[str, int]) -> dict[str, int]:
    """float64 bytes per layer to reduce: A³ (g_q, g_k, g_v for GQA, mlp_x2, tokens), GPTQ (4 Hessians + counts)."""
    d, h, kv = shape["head_dim"], shape["heads"], shape["kv_heads"]
    a3 = (h * d * d + kv * d * d + kv * d * d + shape["ff"] + 1) * 8
    hessians = [shape["hidden"], h * d, shape["hidden"], shape["ff"]]  # q/k/v, o, gate/up, down inputs
    gptq = (sum(n * n for n in hessians) + len(hessians)) * 8
    return {"a3": a3, "gptq": gptq}


def run(args: argparse.Namespace, folder: Path, nproc: int) -> dict:
    recipe = write_a3_gptq_recipe(args, folder / f"nproc-{nproc}.yaml", folder / f"artifact-{nproc}", device="cpu",
                                  checkpoint_every=0)
    with_batch = yaml.safe_load(recipe.read_text())
    for stage in with_batch["stages"][:2]:  # a3, gptq
        stage["batch_size"] = args.batch_size
    recipe.write_text(yaml.safe_dump(with_batch))
    wall, report = run_a3q(recipe, folder / f"out-{nproc}", "--nproc", str(nproc), threads=1)
    rows = {row["stage"]: row for row in report["stages"]}
    reduced = report.get("distributed", {})
    return {"processes": nproc, "wall_s": wall, "pass_s": rows["gptq"].get("shared_pass_seconds", 0.0),
            "a3_s": rows["a3"]["seconds"], "gptq_s": rows["gptq"]["seconds"],
            "bytes_reduced_per_layer": reduced.get("bytes_reduced", 0) / LAYERS,
            "collectives_per_layer": reduced.get("collectives", 0) / LAYERS,
            "worst_gptq_error": rows["gptq"]["worst_relative_error"], "ranks": rows["a3"]["ranks"]}


def agreement(one: Path, two: Path) -> dict:
    """GPTQ codes equal between two artifacts (share of all codes) and their logits' relative difference."""
    import torch

    from a3q.calib.sources import TextSource
    from a3q.calib.windows import sequential_windows
    from a3q.io.loading import load_graph
    from a3q.modeling.a3q_gptq_linear import GPTQLinear

    first, second = load_graph(str(one)), load_graph(str(two))
    modules = dict(second.model.named_modules())
    pairs = [(module.codes(), modules[name].codes()) for name, module in first.model.named_modules()
             if isinstance(module, GPTQLinear)]
    equal = sum(int((a == b).sum()) for a, b in pairs) / sum(a.numel() for a, _ in pairs)
    windows = sequential_windows(first.tokenizer, TextSource(corpus="enwiki", split="test"), 128, 2)
    with torch.no_grad():
        expected, actual = (graph.model(input_ids=windows).logits.double() for graph in (first, second))
    return {"codes_equal": equal, "logits_relative_difference": float((actual - expected).norm() / expected.norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_a3_gptq_arguments(parser, windows=8, seq_len=256, attention_only=False)
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward in both stages")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for nproc in (1, 2):
            rows.append(run(args, folder, nproc))
        rows[1].update(agreement(folder / "artifact-1", folder / "artifact-2"))
    paper = {name: paper_bytes(shape) for name, shape in SHAPES.items()}
    notes = [f"{name}: per layer A³ {b['a3'] / 2**20:.1f} MiB + GPTQ {b['gptq'] / 2**30:.2f} GiB (float64, dense "
             f"shapes), ×{SHAPES[name]['layers']} layers" for name, b in paper.items()]
    notes.append("wall time includes start-up, model loading (per process) and the export; 'pass' is the shared "
                 "A³+GPTQ layer-by-layer pass")
    notes.append(f"2 processes vs 1: {rows[1]['codes_equal']:.4%} of GPTQ codes equal, logits relative difference "
                 f"{rows[1]['logits_relative_difference']:.2e} (batch size {args.batch_size})")

    def render(result: dict) -> None:
        table = Table(title=f"Data-parallel calibration: SmolLM2, A³ 20% + GPTQ 4-bit g64, {args.windows}×{args.seq_len}"
                            f" tokens, batch size {args.batch_size}, 1 thread per process")
        for column in ("processes", "wall s", "pass s", "A³ s", "GPTQ s", "reduced / layer", "collectives / layer",
                       "worst GPTQ error"):
            table.add_column(column, justify="right")
        for row in result["rows"]:
            table.add_row(str(row["processes"]), f"{row['wall_s']:.1f}", f"{row['pass_s']:.1f}", f"{row['a3_s']:.1f}",
                          f"{row['gptq_s']:.1f}", f"{row['bytes_reduced_per_layer'] / 2**20:.2f} MiB",
                          f"{row['collectives_per_layer']:.1f}", f"{row['worst_gptq_error']:.4f}")
        print_with_context(table, result)
        shapes = Table(title="Bytes per layer to reduce (on paper, float64)")
        for column in ("model", "A³ statistics", "GPTQ Hessians", "total per layer", "whole model"):
            shapes.add_column(column, justify="right")
        for name, b in paper.items():
            total = b["a3"] + b["gptq"]
            shapes.add_row(name, f"{b['a3'] / 2**20:.1f} MiB", f"{b['gptq'] / 2**30:.2f} GiB",
                           f"{total / 2**30:.2f} GiB", f"{total * SHAPES[name]['layers'] / 2**30:.0f} GiB")
        from rich.console import Console

        Console().print(shapes)

    finish("distributed", machine_info("cpu"), args, rows, notes, render)


if __name__ == "__main__":
    main()
