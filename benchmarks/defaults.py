"""Which settings should be the defaults: every candidate measured on two texts, as a user's recipe runs it.

Each row is a list of stages run through :func:`a3q.engine.apply_stages` on the loaded model (exactly what a recipe
with those fields does; fields a row does not name take the stage's defaults of the code being measured, so rows
name every field they compare). Calibration: ``--calib-windows`` random windows of 512 tokens of ``enwiki/calib``
(seed 0). Evaluation: the first ``--eval-windows`` windows of ``enwiki/test`` (the suite's protocol) and the first
``--news-windows`` windows of the ``news`` corpus (ABC news stories: another domain, which nothing calibrates on).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/defaults.py --groups gptq --json out/bench/defaults-gptq.json
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/defaults.py --model gemma3-270m --groups allocation \
        --json out/bench/defaults-gemma.json
    .venv/bin/python benchmarks/defaults.py --table out/bench/defaults-*.json

Rows already in ``--json`` are skipped (the run resumes); the file is rewritten after every row.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine_info, machine_line, write_json

PLAIN = {"bits": 4, "group_size": 64, "act_group_aware": False, "true_sequential": False, "damp_percent": 0.01}
AGA = {**PLAIN, "act_group_aware": True}
GPTQ_SETTINGS = {
    "plain (damp 0.01)": PLAIN,
    "act_group_aware (damp 0.01)": AGA,
    "act_group_aware, damp 0.05": {**AGA, "damp_percent": 0.05},
    "act_group_aware, true_sequential, damp 0.05": {**AGA, "true_sequential": True, "damp_percent": 0.05},
}


def rows(group: str, model: str) -> dict[str, list[tuple[str, dict]]]:
    """name → stages, for one group of candidates."""
    if group == "gptq":
        table = {"dense": []}
        for name, fields in GPTQ_SETTINGS.items():
            table[f"gptq 4-bit g64, {name}"] = [("gptq", fields)]
        table["a3 20%"] = [("a3", {"ratio": 0.2, "allocation": "uniform"})]
        for name, fields in GPTQ_SETTINGS.items():
            table[f"a3 20% + gptq 4-bit g64, {name}"] = [("a3", {"ratio": 0.2, "allocation": "uniform"}),
                                                          ("gptq", fields)]
        return table
    if group == "gptq_order":  # issue 32: static activation order against the default (act_group_aware, damp 0.05)
        orders = {"act_order static (damp 0.01)": {**PLAIN, "act_order": "static"},
                  "act_order static, damp 0.05": {**PLAIN, "act_order": "static", "damp_percent": 0.05},
                  "act_group_aware, damp 0.05": {**AGA, "damp_percent": 0.05}}
        table = {}
        for prefix, base in (("", []), ("a3 20% + ", [("a3", {"ratio": 0.2, "allocation": "uniform"})])):
            for name, fields in orders.items():
                table[f"{prefix}gptq 4-bit g64, {name}"] = [*base, ("gptq", fields)]
        return table
    if group == "allocation":
        table = {"dense": []}
        for ratio in (0.1, 0.2, 0.3):
            for allocation in ("uniform", "global"):
                table[f"a3 {ratio:.0%}, {allocation}"] = [("a3", {"ratio": ratio, "allocation": allocation})]
        return table
    if group == "qk_norm":  # keep leaves QK whole: at equal size it takes more of OV and MLP (Gemma-3-270M's sizes)
        table = {f"a3 {ratio:.0%}, qk_norm {mode}": [("a3", {"ratio": ratio, "allocation": "uniform", "qk_norm": mode})]
                 for ratio in (0.1, 0.2) for mode in ("keep", "pre_norm", "post_norm")}
        keep_ratio = 0.2 * 5_570_560 / 4_751_360  # all decoder linears / OV + MLP of one Gemma-3-270M layer
        table["a3 20%, global, qk_norm keep (equal size)"] = [("a3", {"ratio": keep_ratio, "qk_norm": "keep"})]
        for ratio in (0.1, 0.2, 0.3):
            table[f"a3 {ratio:.0%}, global, qk_norm post_norm"] = [("a3", {"ratio": ratio, "qk_norm": "post_norm"})]
        return table
    if group == "head_dims":  # kernel-aware ranks against unconstrained A³ at the same budget (docs/serving.md)
        return {f"a3 20%, {allocation}, head_dims {grid}": [("a3", {"ratio": 0.2, "allocation": allocation,
                                                                   "head_dims": grid})]
                for allocation in ("uniform", "global") for grid in ("any", "vllm-cpu", "flash")}
    raise ValueError(group)


def kv_values(graph) -> dict[str, int]:
    """Cached values per token (all layers): as A³ left them, and as vLLM's CPU attention allocates them (q/k and v
    padded to one head size it runs; a3q.serving.padding)."""
    from a3q.serving.padding import BACKENDS, padded_sizes

    unpadded = sum(layer.kv_values_per_token() for layer in graph.layers)
    padded = sum(layer.num_kv_heads * sum(padded_sizes(layer.qk_head_dim, layer.vo_head_dim, BACKENDS["cpu"]))
                 for layer in graph.layers)
    return {"kv_values": unpadded, "kv_values_vllm_cpu": padded}


def measure(args: argparse.Namespace) -> dict:
    import torch

    from a3q.calib.sources import TextSource
    from a3q.calib.windows import random_windows, sequential_windows
    from a3q.engine import apply_stages
    from a3q.io.loading import load_graph
    from a3q.metrics.perplexity import perplexity

    torch.set_num_threads(args.threads)
    result = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {"rows": {}}
    result.update(model=args.model, machine=machine_info("cpu"), protocol={
        "calibration": f"{args.calib_windows}×512 enwiki/calib, seed 0",
        "enwiki": f"first {args.eval_windows}×512 of enwiki/test", "news": f"first {args.news_windows}×512 of news/all"})
    dense = load_graph(args.model)
    calib = random_windows(dense.tokenizer, TextSource(corpus="enwiki", split="calib"), 512, args.calib_windows, 0)
    texts = {"enwiki": sequential_windows(dense.tokenizer, TextSource(corpus="enwiki", split="test"), 512,
                                          args.eval_windows),
             "news": sequential_windows(dense.tokenizer, TextSource(corpus="news", split="all"), 512,
                                        args.news_windows)}
    console = Console(stderr=True)
    for group in args.groups:
        for name, stages in rows(group, args.model).items():
            if name in result["rows"]:
                continue
            started = time.perf_counter()
            graph, report = apply_stages(copy.deepcopy(dense), stages, windows=calib) if stages else (dense, [])
            seconds = time.perf_counter() - started
            ppl = {text: perplexity(graph.model, windows, progress=False).perplexity for text, windows in texts.items()}
            result["rows"][name] = {"group": group, "stages": stages, "seconds": round(seconds, 1), **ppl,
                                    "params": graph.decoder_linear_params(), "bytes": graph.decoder_linear_bytes(),
                                    **kv_values(graph)}
            console.log(f"{name}: enwiki {ppl['enwiki']:.2f}, news {ppl['news']:.2f} ({seconds:.0f} s)")
            if args.json:
                write_json(args.json, result)
            del graph
    return result


def print_table(results: list[dict]) -> None:
    for result in results:
        table = Table(title=f"{result['model']}: {result['protocol']}")
        for column in ("row", "enwiki ppl", "news ppl", "params", "KV values/token", "on vLLM CPU", "compress s"):
            table.add_column(column, justify="left" if column == "row" else "right")
        for name, row in result["rows"].items():
            kv = (f"{row['kv_values']:,}", f"{row['kv_values_vllm_cpu']:,}") if "kv_values" in row else ("", "")
            table.add_row(name, f"{row['enwiki']:.2f}", f"{row['news']:.2f}", f"{row['params']:,}", *kv,
                          f"{row['seconds']:.0f}")
        console = Console(width=200)
        console.print(table)
        console.print(machine_line(result["machine"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--groups", nargs="+", default=["gptq", "allocation"], choices=["gptq", "gptq_order", "allocation", "qk_norm", "head_dims"])
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--news-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--table", type=Path, nargs="+", default=None, help="only print the tables of these files")
    args = parser.parse_args()
    if args.table:
        print_table([json.loads(path.read_text()) for path in args.table])
        return
    print_table([measure(args)])


if __name__ == "__main__":
    main()
