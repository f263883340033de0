"""``a3q search`` at several budgets against the best hand-written composition, and the proxy's rank error.

    HF_HUB_OFFLINE=1 A3Q_CACHE_DIR=.cache .venv/bin/python benchmarks/search.py --threads 1 \
        --model smollm2-135m --budgets 0.35 0.25 0.15 --json out/bench/search-smollm2.json
    HF_HUB_OFFLINE=1 A3Q_CACHE_DIR=.cache .venv/bin/python benchmarks/search.py --threads 1 \
        --model gemma3-270m --budgets 0.25 --json out/bench/search-gemma.json
    .venv/bin/python benchmarks/search.py --tiny      # a smoke run on a tiny random Llama (seconds)

A budget is a fraction of the bf16 bytes of the input model's decoder linears, i.e. ``bits_per_param = 16 ×
fraction`` (the search measures every built candidate's real artifact). Each budget runs one search (the issue's
smallest space file: every axis at its default) into ``--out/<model>/<fraction>``; a stopped benchmark continues
where it stopped (``--resume`` semantics per search). The hand-written compositions are the rows of docs/results.md
("Quantization and low rank × quantization": int8, nf4, GPTQ 4-bit g64, A³ 10/20% alone and + nf4 / + GPTQ), re-run
under the same calibration and evaluation protocol as the search, with today's stage defaults; the reference at a
budget is the best of them whose real size fits, or, when none fits, the smallest of them (larger than the budget).
Spearman is over the evaluated points of each search: proxy score against measured perplexity (1.0 = same order).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import finish, machine_info, print_with_context, write_json  # noqa: E402

GPTQ4 = {"stage": "gptq", "bits": 4, "group_size": 64}
NF4 = {"stage": "bnb", "quant_type": "nf4"}
HANDWRITTEN: dict[str, list[dict[str, Any]]] = {  # docs/results.md, "Quantization and low rank × quantization"
    "int8": [{"stage": "bnb", "quant_type": "int8"}], "nf4": [NF4], "gptq4-g64": [GPTQ4],
    "a3-10": [{"stage": "a3", "ratio": 0.1}], "a3-20": [{"stage": "a3", "ratio": 0.2}],
    "a3-10+nf4": [{"stage": "a3", "ratio": 0.1}, NF4], "a3-20+nf4": [{"stage": "a3", "ratio": 0.2}, NF4],
    "a3-10+gptq4": [{"stage": "a3", "ratio": 0.1}, GPTQ4], "a3-20+gptq4": [{"stage": "a3", "ratio": 0.2}, GPTQ4],
}


def tiny_model(folder: Path) -> str:
    """A random two-layer Llama with SmolLM2's tokenizer (the --tiny smoke run)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from a3q.assets.models import smollm2_path

    if not (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path()))
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
        LlamaForCausalLM(config).eval().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def base_space(args: argparse.Namespace, model: str) -> dict[str, Any]:
    seq_len = 32 if args.tiny else 512
    space = {"model": model,
             "calibration": {"corpus": "enwiki", "split": "calib", "windows": args.calib_windows, "seq_len": seq_len,
                             "seed": 0},
             "evaluate": {"corpus": "enwiki", "split": "test", "seq_len": seq_len, "max_windows": args.eval_windows}}
    if args.tiny:  # a small space: uniform A³ (no probes), group sizes that fit hidden 64
        space.update(a3={"ratios": [0.0, 0.25], "allocation": ["uniform"]}, evaluate_top=4,
                     weights=["none", {"gptq": {"bits": 4, "group_size": 32}}, {"gptq": {"bits": 3, "group_size": 32}},
                              {"bnb": {"quant_type": "nf4"}}, {"bnb": {"quant_type": "int8"}}])
    return space


def run_references(args: argparse.Namespace, space: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Each hand-written composition built once with the search's protocol; its real size and perplexity. Its A³
    part is the searches' own shared build (``out/a3``; the same as one run from the model: tests/search)."""
    from a3q.engine import run_recipe
    from a3q.recipe import parse_recipe
    from a3q.search.candidate import Candidate
    from a3q.search.driver import build_a3, finished_report
    from a3q.search.sizes import artifact_linear_bytes
    from a3q.search.space import parse_space

    parsed, shape, _ = parse_space({**space, "budget": {"max_ppl": 1e9}})
    rows = []
    for name, stages in HANDWRITTEN.items():
        model, rest = space["model"], list(stages)
        if rest[0]["stage"] == "a3":
            a3 = Candidate(a3_ratio=rest[0]["ratio"], allocation="uniform" if args.tiny else "global")
            model, rest = build_a3(parsed, a3, out / "a3" / a3.a3_key), rest[1:]
        if args.tiny:
            rest = [{**s, "group_size": 32} if s["stage"] == "gptq" else s for s in rest]
        folder = out / "references" / name
        report = finished_report(folder)
        if report is None:
            raw = {"model": model, "calibration": space["calibration"],
                   "stages": [*rest, {"stage": "evaluate", **space["evaluate"]},
                              {"stage": "export", "path": str(folder / "artifact")}]}
            if folder.exists():
                shutil.rmtree(folder)
            report = run_recipe(parse_recipe(raw), folder, show_table=False).report.to_json()
        ppl = next(row["ppl"] for row in report["stages"] if row.get("ppl") is not None)
        linear_bytes = artifact_linear_bytes(folder / "artifact", shape.family)
        rows.append({"name": name, "ppl": ppl, "bits_per_param": 8 * linear_bytes / shape.linear_params()})
    return rows


def reference_at(references: list[dict[str, Any]], bits: float) -> dict[str, Any]:
    """The best hand-written composition within ``bits``; the smallest one when none is."""
    inside = [r for r in references if r["bits_per_param"] <= bits]
    if inside:
        return {**min(inside, key=lambda r: r["ppl"]), "fits": True}
    return {**min(references, key=lambda r: r["bits_per_param"]), "fits": False}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.35, 0.25, 0.15],
                        help="fractions of the bf16 bytes of the decoder linears")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--skip-references", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="smoke run on a tiny random Llama")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("out/bench/search"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from a3q.search.driver import run_search

    info = machine_info("cpu")
    out = args.out / ("tiny" if args.tiny else args.model)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model(out / "model") if args.tiny else args.model
    space = base_space(args, model)
    references = [] if args.skip_references else run_references(args, space, out)
    rows = []
    for fraction in args.budgets:
        bits = 16 * fraction
        path = out / f"space-{fraction:g}.yaml"
        path.write_text(yaml.safe_dump({**space, "budget": {"bits_per_param": bits}}, sort_keys=False))
        started = time.perf_counter()
        folder = out / f"search-{fraction:g}"
        result = run_search(path, folder, resume=(folder / "search-state.json").exists(), progress=True,
                            a3_dir=out / "a3")  # A³ builds do not depend on the budget: one per ratio for all
        front = yaml.safe_load((folder / "front.json").read_text())
        best = result.best or {}
        ref = reference_at(references, bits) if references else None
        rows.append({
            "model": args.model if not args.tiny else "tiny", "fraction": fraction, "bits_budget": bits,
            "pick": best.get("key"), "pick_bits": best.get("bits_per_param"), "pick_ppl": best.get("ppl"),
            "reference": ref, "spearman": front["spearman_proxy_ppl"], "built": len(result.points),
            "minutes": (time.perf_counter() - started) / 60,
        })
    notes = [f"calibration {args.calib_windows} windows, evaluation {args.eval_windows} windows of enwiki/test",
             "budget = fraction × bf16 bytes of the decoder linears; sizes are the real artifacts' "
             "(a3q.search.sizes.artifact_linear_bytes)", "minutes = wall time of the search (a rerun resumes)"]
    result = finish("search", info, args, rows, notes, render)
    if args.json:  # every hand-written composition's measured point goes with the picks
        write_json(args.json, {**result, "references": references})


def render(result: dict[str, Any]) -> None:
    table = Table(title="a3q search: the pick against the best hand-written composition")
    for column in ("model", "budget", "pick", "bits", "ppl", "hand-written", "bits ", "ppl ", "Spearman", "min"):
        table.add_column(column, justify="left" if column in ("model", "pick", "hand-written") else "right")
    for row in result["rows"]:
        ref = row["reference"] or {}
        table.add_row(row["model"], f"{row['fraction']:.0%} ({row['bits_budget']:.2f} b)", str(row["pick"]),
                      f"{row['pick_bits']:.3f}" if row["pick_bits"] else "–",
                      f"{row['pick_ppl']:.3f}" if row["pick_ppl"] else "–",
                      (ref.get("name", "–") + ("" if ref.get("fits", True) else " (larger)")),
                      f"{ref['bits_per_param']:.3f}" if ref else "–", f"{ref['ppl']:.3f}" if ref else "–",
                      f"{row['spearman']:.2f}" if row["spearman"] is not None else "–", f"{row['minutes']:.1f}")
    print_with_context(table, result)


if __name__ == "__main__":
    main()
