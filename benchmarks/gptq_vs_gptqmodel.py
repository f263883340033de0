"""a3q's GPTQ stage against GPTQModel (the maintained reference GPTQ) on the real SmolLM2-135M, same calibration.

    make gptqmodel-venv   # once: GPTQModel lives in its own venv (it pins numpy 2.2.6)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gptq_vs_gptqmodel.py --json out/bench/gptq_vs_gptqmodel.json
    # a quick run:
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gptq_vs_gptqmodel.py --windows 8 --seq-len 256 --eval-windows 4
    .venv/bin/python benchmarks/gptq_vs_gptqmodel.py --table out/bench/gptq_vs_gptqmodel.json

Protocol: calibration = ``--windows`` random windows × ``--seq-len`` tokens of enwiki/calib (seed 0), cut by
a3q.calib.windows.random_windows exactly as a recipe's ``calibration`` block cuts them, and the same token ids are
handed to GPTQModel (attention mask all ones). Evaluation = the first ``--eval-windows`` × ``--eval-seq-len`` windows
of enwiki/test; perplexity as a3q.metrics.perplexity (float64 cross-entropy per window, mean over every predicted
token, exp), computed in each venv from its own logits.

Rows:
* dense: the float32 model (a3q).
* a3q GPTQ: the recipe ``gptq`` stage (+ ``export``); ``quantize s`` is the stage's report seconds (its own
  calibration forward passes included). Its perplexity is measured twice: in a3q (GPTQLinear, float32 dequant) and
  after loading the export with plain ``transformers.AutoModelForCausalLM.from_pretrained`` in ``.venv-gptqmodel``
  (gptqmodel's ``gptq_torch`` kernel); ``max |Δ logit|`` compares those two on the first ``--logit-windows`` windows.
* GPTQModel: ``model.quantize()`` seconds only (not loading/saving) with settings matched to a3q's (damp 0.01, no
  GAR ordering, desc_act = act_order, true_sequential off unless ``--gptqmodel-true-sequential``); perplexity after
  loading its checkpoint with plain transformers, and (``ppl in a3q``) after a3q decodes the same file with its own
  GPTQ v1 reader: both must agree, which checks a3q's layout against GPTQModel's.
``--gptqmodel-stock`` adds a row with GPTQModel's own defaults (damp 0.05, GAR on, true_sequential on).

``--a3q-settings`` runs a3q's stage once per setting (default: ``plain``, the matched one); a setting joins options
with ``+``: ``aga`` (act_group_aware), ``ts`` (true_sequential), ``auto`` (damp_auto), ``actorder`` (act_order),
``damp0.05`` (damp_percent). E.g. ``--a3q-settings plain aga aga+ts+damp0.05``. ``--skip-gptqmodel`` runs a3q's side
only (no ``.venv-gptqmodel`` needed): no GPTQModel rows and no transformers load of a3q's export. The JSON is
rewritten after every row.

    # a3q's side only, three settings, full protocol (32×512 calibration, 16×512 evaluation)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gptq_vs_gptqmodel.py --threads 1 --skip-gptqmodel \
        --a3q-settings aga aga+ts aga+ts+damp0.05 --json out/bench/gptq_a3q_settings.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import SMOLLM2_ALIAS, finish, machine_info, machine_line, write_json

ROOT = Path(__file__).resolve().parent.parent
SIDE = Path(__file__).resolve().parent / "gptqmodel_side.py"
DEFAULT_PYTHON = ROOT / ".venv-gptqmodel" / "bin" / "python"


def run_side(args, command: list[str], cwd: Path, console: Console) -> None:
    """Run gptqmodel_side.py in the gptqmodel venv, in a scratch cwd (gptqmodel writes ./logs/)."""
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS=str(min(2, os.cpu_count() or 1)), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    cwd.mkdir(parents=True, exist_ok=True)
    log = cwd / f"{command[0]}.log"
    console.log(f"gptqmodel venv: {command[0]} → {log}")
    with log.open("a") as out:
        done = subprocess.run([str(args.gptqmodel_python), str(SIDE), *command, "--threads", str(args.threads)],
                              cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"gptqmodel_side.py {command[0]} failed (exit {done.returncode}); last lines of {log}:\n{tail}")


def side_scores(args, model_dir: Path, tokens: Path, out: Path, cwd: Path, console: Console) -> dict:
    run_side(args, ["logits", "--model", str(model_dir), "--tokens", str(tokens), "--out", str(out),
                    "--logit-windows", str(args.logit_windows), "--backend", args.backend], cwd, console)
    return json.loads(Path(str(out) + ".json").read_text())


SETTING_OPTIONS = {"aga": ("act_group_aware", True), "ts": ("true_sequential", True), "auto": ("damp_auto", True),
                   "actorder": ("act_order", True)}


def parse_setting(setting: str, args) -> dict:
    """``aga+ts+damp0.05`` → the gptq stage's fields (on top of the bits/group/sym/act-order/damp options)."""
    fields = {"act_order": args.act_order, "damp_percent": args.damp_percent}
    for part in setting.split("+"):
        if part == "plain":
            continue
        if part.startswith("damp"):
            fields["damp_percent"] = float(part[4:])
        elif part in SETTING_OPTIONS:
            key, value = SETTING_OPTIONS[part]
            fields[key] = value
        else:
            raise SystemExit(f"unknown a3q setting part {part!r} (known: plain, damp<x>, {', '.join(SETTING_OPTIONS)})")
    return fields


def a3q_quantize(args, work: Path, console: Console, setting: str = "plain"):
    from a3q.engine import run_recipe
    from a3q.recipe import parse_recipe

    shutil.rmtree(work / "a3q_export", ignore_errors=True)
    shutil.rmtree(work / "a3q_run", ignore_errors=True)
    recipe = {
        "model": SMOLLM2_ALIAS,
        "calibration": {"corpus": "enwiki", "split": "calib", "windows": args.windows, "seq_len": args.seq_len,
                        "seed": args.seed},
        "stages": [
            {"stage": "gptq", "bits": args.bits, "group_size": args.group_size, "sym": args.sym,
             **parse_setting(setting, args)},
            {"stage": "export", "path": str(work / "a3q_export")},
        ],
    }
    result = run_recipe(parse_recipe(recipe), work / "a3q_run", console=console, show_table=False)
    row = next(r for r in result.report.rows if r["stage"] == "gptq")
    return result.graph, row


def gptqmodel_in_a3q(folder: Path, target: Path, args):
    """GPTQModel's checkpoint read by a3q's own GPTQ v1 loader (config.a3q_gptq lists the quantized linears)."""
    from safetensors import safe_open

    from a3q.io.loading import load_graph

    target.mkdir(parents=True, exist_ok=True)
    modules = []
    for weights in sorted(folder.glob("*.safetensors")):
        with safe_open(str(weights), "pt") as handle:
            modules += [key.removesuffix(".qweight") for key in handle.keys() if key.endswith(".qweight")]
        (target / weights.name).unlink(missing_ok=True)
        (target / weights.name).symlink_to(weights.resolve())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, target / name)
    config = json.loads((folder / "config.json").read_text())
    config["a3q_gptq"] = {"bits": args.bits, "group_size": args.group_size, "sym": args.sym,
                          "act_order": args.act_order, "modules": sorted(modules)}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return load_graph(str(target))


def compare_logits(ours, theirs_file: Path) -> dict:
    from safetensors.torch import load_file

    saved = load_file(str(theirs_file))
    theirs = saved["logits"]
    ours = ours[: theirs.shape[0]]
    diff = (ours - theirs).abs()
    result = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
              "logit_scale": float(ours.abs().max()),
              "argmax_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
              "compared": list(ours.shape)}
    if "logits_fp32_scales" in saved:  # gptqmodel's kernel with its fp16 dequant rounding removed
        result["max_abs_diff_fp32_scales"] = float((ours - saved["logits_fp32_scales"]).abs().max())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration tokens per window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--damp-percent", type=float, default=0.01)
    parser.add_argument("--gptqmodel-true-sequential", action="store_true",
                        help="GPTQModel: quantize q/k/v, then o, then gate/up, then down with updated inputs (a3q: one pass per layer)")
    parser.add_argument("--gptqmodel-stock", action="store_true", help="also run GPTQModel with its own defaults")
    parser.add_argument("--a3q-settings", nargs="+", default=["plain"],
                        help="a3q gptq settings, one row each: plain, or options joined by + (aga, ts, auto, actorder, damp<x>)")
    parser.add_argument("--skip-gptqmodel", action="store_true",
                        help="a3q's side only: no GPTQModel rows, no transformers load of the export (no second venv)")
    parser.add_argument("--backend", default="gptq_torch", help="gptqmodel kernel for the transformers loads")
    parser.add_argument("--logit-windows", type=int, default=2, help="windows whose full logits are compared")
    parser.add_argument("--gptqmodel-python", type=Path, default=DEFAULT_PYTHON)
    parser.add_argument("--workdir", type=Path, default=None, help="keep checkpoints here (default: a temp dir, removed)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both venvs")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--table", type=Path, nargs="+", default=None, help="only print the table of these JSON files")
    args = parser.parse_args()
    if args.table:
        for path in args.table:
            print_table(json.loads(path.read_text()))
        return
    for setting in args.a3q_settings:
        parse_setting(setting, args)  # fail before any work
    if not args.skip_gptqmodel and not args.gptqmodel_python.is_file():
        raise SystemExit(f"{args.gptqmodel_python} not found: run `make gptqmodel-venv` first")

    import torch
    from safetensors.torch import save_file

    from a3q.assets.models import smollm2_path
    from a3q.calib.sources import enwiki
    from a3q.calib.windows import random_windows, sequential_windows
    from a3q.io.loading import load_graph
    from a3q.metrics.perplexity import perplexity

    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    info = machine_info("cpu")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="a3q-gptq-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("a3q_export", "gptqmodel", "gptqmodel_stock", "a3q_run"):
        shutil.rmtree(work / stale, ignore_errors=True)
    rows: list[dict] = []
    notes: list[str] = []
    try:
        dense = load_graph(SMOLLM2_ALIAS)
        calib = random_windows(dense.tokenizer, enwiki("calib"), args.seq_len, args.windows, args.seed)
        test = sequential_windows(dense.tokenizer, enwiki("test"), args.eval_seq_len, args.eval_windows)
        save_file({"input_ids": calib.contiguous()}, str(work / "calib.safetensors"))
        save_file({"input_ids": test.contiguous()}, str(work / "eval.safetensors"))
        dense_ppl = perplexity(dense.model, test, progress=False).perplexity
        rows.append(dict(method="dense fp32", seconds=None, ppl=dense_ppl, ppl_transformers=None, ppl_in_a3q=None))
        console.log(rows[-1])
        model_dir = smollm2_path()
        del dense

        for setting in args.a3q_settings:
            # (a) a3q's GPTQ stage + export
            graph, stage_row = a3q_quantize(args, work, console, setting)
            a3q_ppl = perplexity(graph.model, test, progress=False).perplexity
            with torch.no_grad():
                ours = graph.model(input_ids=test[: args.logit_windows], use_cache=False).logits.float()
            del graph
            method = "a3q gptq" if setting == "plain" else f"a3q gptq ({setting})"
            row = dict(method=method, setting=setting, seconds=stage_row["seconds"], ppl=a3q_ppl, ppl_transformers=None,
                       ppl_in_a3q=a3q_ppl, note=stage_row.get("note", ""),
                       worst_relative_error=stage_row.get("worst_relative_error"),
                       damp_percent_used=sorted({d for layer in stage_row.get("damp_percent_used", []) for d in layer.values()}))
            if not args.skip_gptqmodel:
                # (d) the export loaded by plain transformers (+ gptqmodel) in the other venv
                a3q_scores = side_scores(args, work / "a3q_export", work / "eval.safetensors",
                                         work / "a3q_export.scores.safetensors", work / "cwd", console)
                row.update(ppl_transformers=a3q_scores["perplexity"], kernels=a3q_scores["kernels"],
                           cross_load=compare_logits(ours, work / "a3q_export.scores.safetensors"))
            rows.append(row)
            console.log(rows[-1])
            if args.json:  # keep what is measured so far
                write_json(args.json, {"benchmark": "gptq_vs_gptqmodel", "machine": info, "partial": True, "rows": rows})
            del ours

        # (b) GPTQModel, same calibration tokens
        variants = [] if args.skip_gptqmodel else [
            ("gptqmodel", ["--damp-percent", str(args.damp_percent), "--no-act-group-aware",
                           "--true-sequential" if args.gptqmodel_true_sequential else "--no-true-sequential"])]
        if args.gptqmodel_stock and not args.skip_gptqmodel:
            variants.append(("gptqmodel_stock", ["--damp-percent", "0.05", "--act-group-aware", "--true-sequential"]))
        for name, extra in variants:
            out = work / name
            run_side(args, ["quantize", "--model", str(model_dir), "--calib", str(work / "calib.safetensors"),
                            "--out", str(out), "--bits", str(args.bits), "--group-size", str(args.group_size),
                            "--sym" if args.sym else "--no-sym", "--desc-act" if args.act_order else "--no-desc-act",
                            *extra], work / "cwd", console)
            quantized = json.loads((out / "gptqmodel_quantize.json").read_text())
            scores = side_scores(args, out, work / "eval.safetensors", work / f"{name}.scores.safetensors", work / "cwd", console)
            reread = gptqmodel_in_a3q(out, work / f"{name}_in_a3q", args)
            in_a3q = perplexity(reread.model, test, progress=False).perplexity
            with torch.no_grad():
                reread_logits = reread.model(input_ids=test[: args.logit_windows], use_cache=False).logits.float()
            del reread
            rows.append(dict(method=name, seconds=quantized["seconds"], ppl=scores["perplexity"],
                             ppl_transformers=scores["perplexity"], ppl_in_a3q=in_a3q,
                             cross_load=compare_logits(reread_logits, work / f"{name}.scores.safetensors"),
                             kernels=scores["kernels"], gptqmodel_config=quantized["config"],
                             note=", ".join(f"{k}={v}" for k, v in quantized["config"].items()
                                            if k in ("damp_percent", "act_group_aware", "true_sequential"))))
            console.log(rows[-1])
        notes += [
            f"calibration {args.windows}×{args.seq_len} enwiki/calib seed {args.seed}; eval {test.shape[0]}×{args.eval_seq_len} enwiki/test",
            f"{args.bits}-bit, group {args.group_size}, sym={args.sym}, act_order={args.act_order}, damp {args.damp_percent}",
            "quantize s: a3q = gptq stage (incl. its calibration forwards); GPTQModel = model.quantize() only",
            *(["--skip-gptqmodel: a3q's side only (no GPTQModel rows, no transformers load of the export)"]
              if args.skip_gptqmodel else []),
            f"transformers loads: AutoModelForCausalLM.from_pretrained(dir, device_map='cpu', dtype=float32), gptqmodel backend {args.backend}",
            "max |Δ logit| (a3q row): a3q in-process vs its export loaded by transformers; (GPTQModel rows): "
            "transformers load vs a3q reading the same checkpoint; '… fp32 scales': the same with gptqmodel's kernel "
            "dequantizing in float32 (its stock torch kernel rounds W = s·(q−z) to float16)",
        ]
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    finish("gptq_vs_gptqmodel", info, args, rows, notes, print_table)


def _fmt(value, spec=".2f") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return "diverged"
    return format(value, spec)


def print_table(result: dict) -> None:
    rows = result["rows"]
    dense = next(r["ppl"] for r in rows if r["method"] == "dense fp32")
    table = Table(title=f"GPTQ on SmolLM2-135M: a3q vs GPTQModel ({'; '.join(result['notes'][:2])})")
    for column in ["method", "quantize s", "ppl", "× dense", "ppl (transformers load)", "ppl (a3q reads file)",
                   "max |Δ logit|", "… fp32 scales", "argmax agree", "note"]:
        table.add_column(column, justify="left" if column in ("method", "note") else "right")
    for r in rows:
        cross = r.get("cross_load") or {}
        table.add_row(r["method"], _fmt(r["seconds"], ".1f"), _fmt(r["ppl"]), _fmt(r["ppl"] / dense, ".3f"),
                      _fmt(r["ppl_transformers"]), _fmt(r["ppl_in_a3q"]), _fmt(cross.get("max_abs_diff"), ".2e"),
                      _fmt(cross.get("max_abs_diff_fp32_scales"), ".2e"), _fmt(cross.get("argmax_agreement"), ".4f"), r.get("note", ""))
    console = Console(width=220)
    console.print(table)
    for note in result["notes"][2:]:
        console.print(f"  {note}")
    console.print(machine_line(result["machine"]))


if __name__ == "__main__":
    main()
