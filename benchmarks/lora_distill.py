"""``lora_heal.py --distill``: the ``lora`` stage's losses (``lm``, ``kd``, ``kd+lm``) compared on one A³ model.

Why one process and ``apply_stage`` rather than a recipe per row: dense SmolLM2 (also the teacher) loads once and
A³ is computed once, so the 25-minute budget goes to training. Each row trains a deep copy for the same steps,
windows (enwiki/calib, seed 0) and learning rate; only the loss differs. The dense + LoRA ``lm`` row is the control
(how much of the gain is domain adaptation, which a dense model gets too). The stage's teacher cache lives in a
temporary folder here (outside a recipe), so each kd row pays for its own teacher pass: ``teacher s`` includes
loading the teacher.

The top-k table is the measurement behind ``teacher_top_k``'s default: on held-out windows it gives, per ``k``,
the teacher's mean tail mass and the share of the full-vocabulary KL(teacher ‖ A³ student) that the ``k + 1``
buckets keep (the bucketed KL is a lower bound of the full one).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from bench_common import finish, machine_info, print_with_context, write_json
from rich.console import Console
from rich.table import Table

TOP_KS = (4, 8, 16, 32, 64, 128, 256, 1024)
LOSSES = ("lm", "kd", "kd+lm")


def top_k_sweep(teacher, student, windows: torch.Tensor) -> list[dict]:
    """Per ``k``: mean teacher tail mass, bucketed and full KL per prediction, and their ratio."""
    from a3q.stages.lora.distill import kd_loss, teacher_targets

    with torch.no_grad():
        zt = teacher.model(input_ids=windows, use_cache=False).logits[:, :-1]
        zs = student.model(input_ids=windows, use_cache=False).logits[:, :-1]
        full = float(torch.nn.functional.kl_div(torch.log_softmax(zs, -1), torch.log_softmax(zt, -1),
                                                log_target=True, reduction="sum")) / (zt.shape[0] * zt.shape[1])
        rows = []
        for k in TOP_KS:
            targets = teacher_targets(zt, k, 1.0)
            kept = float(kd_loss(zs, targets, 1.0, reduction="mean"))
            rows.append({"k": k, "tail_mass": float(targets.tail.exp().mean()), "kl_buckets": kept, "kl_full": full,
                         "kept": kept / full, "cache_bytes_per_token": 8 * k + 4})
    return rows


def run_distill(args: argparse.Namespace) -> None:
    from a3q.calib.sources import TextSource, enwiki
    from a3q.calib.windows import random_windows, sequential_windows
    from a3q.engine import apply_stage
    from a3q.io.loading import load_graph
    from a3q.metrics.perplexity import perplexity

    console = Console(stderr=True)
    steps, evals = args.steps or 60, args.eval_windows or 12
    info = machine_info("cpu")
    started = time.perf_counter()
    dense = load_graph(args.model)
    tokenizer = dense.tokenizer
    calibration = random_windows(tokenizer, enwiki("calib"), 512, args.calib_windows, 0)
    clock = time.perf_counter()
    # global allocation's 90 sensitivity probes dominate A³'s time here (~9 s each at the defaults, 2 × 256 tokens):
    # one window of 128 tokens per probe keeps the benchmark inside its budget
    student, _ = apply_stage(copy.deepcopy(dense), "a3", windows=calibration, ratio=args.ratio, probe_windows=1,
                             probe_seq_len=128)
    if args.quant == "gptq4":  # the stage's defaults otherwise: LoRA then trains on the quantized base (like QLoRA)
        student, _ = apply_stage(student, "gptq", windows=calibration, bits=4, group_size=64)
    a3_seconds = time.perf_counter() - clock
    assert student.source == args.model  # teacher: input loads this again
    console.log(f"A³ {args.ratio:.0%}{' + GPTQ 4-bit g64' if args.quant == 'gptq4' else ''}: {a3_seconds:.0f} s")
    texts = {"enwiki/test": sequential_windows(tokenizer, enwiki("test"), 512, evals),
             "news/all": sequential_windows(tokenizer, TextSource(corpus="news", split="all"), 512, evals)}

    def ppl(graph) -> dict[str, float]:
        return {name: perplexity(graph.model, windows, batch_size=2, progress=False).perplexity
                for name, windows in texts.items()}

    sweep = top_k_sweep(dense, student, sequential_windows(tokenizer, enwiki("test"), 256, 4))
    console.log("top-k: " + ", ".join(f"k={r['k']} keeps {r['kept']:.1%} (tail {r['tail_mass']:.3f})" for r in sweep))
    before = {"dense": ppl(dense), "a3": ppl(student)}
    rows = []
    plan = [("a3", loss, None) for loss in LOSSES] + ([] if args.no_control else [("dense", "lm", None)])
    if args.distill_layers:
        plan.append(("a3", "kd", args.distill_layers))
    for base, loss, layers in plan:
        fields = dict(r=8, alpha=16, lr=1e-3, steps=steps, batch_size=1, seq_len=args.seq_len, seed=0, loss=loss)
        if loss != "lm":
            fields["teacher_top_k"] = args.top_k
        if layers:
            fields.update(distill_layers=layers, distill_weight=args.distill_weight)
        trained, metrics = apply_stage(copy.deepcopy(dense if base == "dense" else student), "lora", **fields)
        after = ppl(trained)
        label = loss + (f" + layers {','.join(map(str, layers))}" if layers else "")
        rows.append({"base": base if base == "dense" else "student", "loss": label, "before": before[base], "after": after,
                     "train_loss": metrics["train_loss"], "seconds_per_step": metrics["seconds_per_step"],
                     "teacher_seconds": metrics.get("teacher_seconds"),
                     "teacher_cache_bytes": metrics.get("teacher_cache_bytes"),
                     "teacher_tail_mass": metrics.get("teacher_tail_mass")})
        console.log(f"{base} {label}: {after} ({metrics['seconds_per_step']:.2f} s/step)")
        if args.json:  # partial results survive a run cut short
            write_json(args.json.with_suffix(".partial.json"), {"rows": rows, "top_k": sweep, "before": before})
        del trained
    quantized = " + GPTQ 4-bit g64 (sym, the stage's defaults)" if args.quant == "gptq4" else ""
    notes = [f"{args.model}: A³ {args.ratio:.0%}{quantized} (global allocation, the default; probes of 1 × 128 "
             "tokens instead of 2 × 256), "
             f"calibration {args.calib_windows}×512 enwiki/calib; A³ took {a3_seconds:.0f} s",
             f"LoRA r=8 alpha=16 lr=1e-3 on all decoder linears, {steps} steps × 1 window of {args.seq_len} tokens "
             f"(enwiki/calib, seed 0); kd: teacher = the dense model, teacher_top_k {args.top_k}, temperature 1, "
             "kd+lm: kd_weight 0.5",
             f"perplexity: the first {evals} windows × 512 tokens of enwiki/test and of news/all",
             f"total {time.perf_counter() - started:.0f} s"]
    result = finish("lora_distill", info, args, rows, notes, lambda r: render(r, sweep))
    if args.json:  # finish wrote the rows; the top-k measurement goes with them
        write_json(args.json, {**result, "top_k": sweep, "before": before})


def render(result: dict, sweep: list[dict]) -> None:
    settings = result["settings"]
    student = f"A³ {settings['ratio']:.0%}" + (" + GPTQ 4-bit" if settings.get("quant") == "gptq4" else "")
    table = Table(title=f"LoRA healing of {student} {settings['model']} by loss: perplexity before → after")
    for column in ("base", "loss", "enwiki/test", "news/all", "train loss", "s/step", "teacher s", "cache MiB"):
        table.add_column(column, justify="left" if column in ("base", "loss") else "right")
    for row in result["rows"]:
        cells = [f"{row['before'][name]:.2f} → {row['after'][name]:.2f}" for name in ("enwiki/test", "news/all")]
        cache = row["teacher_cache_bytes"]
        table.add_row(row["base"], row["loss"], *cells, f"{row['train_loss']:.3f}", f"{row['seconds_per_step']:.2f}",
                      f"{row['teacher_seconds']:.1f}" if row["teacher_seconds"] is not None else "",
                      f"{cache / 2**20:.1f}" if cache is not None else "")
    print_with_context(table, result)
    topk = Table(title="teacher_top_k: KL(teacher ‖ A³ student) kept by k + 1 buckets (4 × 256 enwiki/test tokens)")
    for column in ("k", "teacher tail mass", "bucketed KL", "full KL", "kept", "cache bytes/token"):
        topk.add_column(column, justify="right")
    for r in sweep:
        topk.add_row(str(r["k"]), f"{r['tail_mass']:.4f}", f"{r['kl_buckets']:.4f}", f"{r['kl_full']:.4f}",
                     f"{r['kept']:.1%}", str(r["cache_bytes_per_token"]))
    Console().print(topk)
