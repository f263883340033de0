"""Healing compressed SmolLM2 with LoRA: enwiki/test perplexity before and after, on float, nf4 and GPTQ bases;
with ``--distill``, the ``lm``, ``kd`` and ``kd+lm`` losses compared on one A³ model.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lora_heal.py --threads 1 --json out/bench/lora.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lora_heal.py --distill --threads 1 --json out/bench/lora-kd.json

``--distill`` (:mod:`lora_distill`): dense SmolLM2 is loaded once (it is also the teacher, ``teacher: input``), A³
``--ratio`` (the stage's defaults: global allocation) is computed once, and each loss trains a copy for the same
steps and windows; a dense model + LoRA ``lm`` is the control. Perplexity on held-out Wikipedia (enwiki/test) and on
``news`` (a domain nobody trains on); teacher-cache time and size, seconds per step. It also measures, for the
choice of ``teacher_top_k``, how much of the full-vocabulary KL the top-k buckets keep.

Each row is a recipe run by the engine: A³ (uniform ``--ratio``) → [bnb nf4 | gptq 4-bit g64] → evaluate → lora
(r=8, alpha 16, lr 1e-3, every decoder linear, ``--steps`` steps of one ``--seq-len``-token window of enwiki/calib),
which re-runs that evaluation after training. Calibration: ``--calib-windows`` × 512 tokens of enwiki/calib (seed 0); evaluation: the first
``--eval-windows`` × 512 tokens of enwiki/test, which LoRA never trains on. ``train s`` is the lora stage's time.
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

BASES = {"float": [], "nf4": [{"stage": "bnb", "quant_type": "nf4"}],
         "gptq4": [{"stage": "gptq", "bits": 4, "group_size": 64, "sym": True}]}


def run_row(base: str, args: argparse.Namespace) -> dict:
    from a3q.engine import run_recipe
    from a3q.recipe import parse_recipe

    evaluate = {"stage": "evaluate", "split": "test", "seq_len": 512, "max_windows": args.eval_windows}
    lora = {"stage": "lora", "r": 8, "alpha": 16, "lr": 1e-3, "steps": args.steps, "batch_size": 1,
            "seq_len": args.seq_len, "seed": 0}
    recipe = parse_recipe({
        "model": "smollm2-135m",
        "calibration": {"corpus": "enwiki", "split": "calib", "windows": args.calib_windows, "seq_len": 512, "seed": 0},
        # lora repeats the evaluation before it once trained: its row holds ppl_before and ppl (after)
        "stages": [{"stage": "a3", "ratio": args.ratio}, *BASES[base], evaluate, lora],
    })
    rows = run_recipe(recipe, args.out / base, show_table=False).report.rows
    trained = next(row for row in rows if row["stage"] == "lora")
    return {"before": trained["ppl_before"], "after": trained["ppl"], "train_loss": trained.get("train_loss"),
            "train_seconds": trained["train_seconds"], "weight_bytes": trained["weight_bytes"]}


def render(result: dict) -> None:
    table = Table(title="LoRA healing after A³, SmolLM2-135M, enwiki/test perplexity")
    for column in ("base", "before", "after", "change", "final train loss", "train s", "weight bytes"):
        table.add_column(column, justify="left" if column == "base" else "right")
    for row in result["rows"]:
        table.add_row(row["base"], f"{row['before']:.2f}", f"{row['after']:.2f}", f"{row['after'] / row['before'] - 1:+.1%}",
                      f"{row['train_loss']:.3f}" if row["train_loss"] is not None else "", f"{row['train_seconds']:.0f}",
                      f"{row['weight_bytes'] / 2**20:.1f} MiB")
    print_with_context(table, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=None, help="default 300 (--distill: 60)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=None, help="default 40 (--distill: 12)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("out/bench/lora-runs"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--distill", action="store_true", help="compare lm, kd and kd+lm (see the docstring)")
    parser.add_argument("--top-k", type=int, default=64, help="--distill: teacher_top_k of the kd rows")
    parser.add_argument("--distill-layers", type=int, nargs="+", default=None,
                        help="--distill: add a kd row that also matches these layers' hidden states")
    parser.add_argument("--distill-weight", type=float, default=1.0, help="--distill: weight of that MSE")
    parser.add_argument("--model", default="smollm2-135m", help="--distill: the dense model (also the teacher)")
    parser.add_argument("--quant", choices=["none", "gptq4"], default="none",
                        help="--distill: quantize the A³ student (GPTQ 4-bit g64) before LoRA")
    parser.add_argument("--no-control", action="store_true", help="--distill: leave out the dense + LoRA row")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.distill:
        from lora_distill import run_distill  # noqa: PLC0415 (only this mode needs it)

        run_distill(args)
        return
    args.steps, args.eval_windows = args.steps or 300, args.eval_windows or 40
    info = machine_info("cpu")
    rows = []
    for base in args.bases:
        started = time.perf_counter()
        rows.append({"base": base, **run_row(base, args)})
        Console(stderr=True).log(f"{base}: {rows[-1]['before']:.2f} → {rows[-1]['after']:.2f} ({time.perf_counter() - started:.0f} s)")
    notes = [f"A³ {args.ratio:.0%} uniform; calibration {args.calib_windows}×512, evaluation {args.eval_windows}×512 enwiki/test",
             f"LoRA r=8 alpha=16 lr=1e-3 on all decoder linears, {args.steps} steps × 1 window of {args.seq_len} tokens"]
    finish("lora_heal", info, args, rows, notes, render)


if __name__ == "__main__":
    main()
