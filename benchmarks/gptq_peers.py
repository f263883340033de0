"""a3q's GPTQ against llm-compressor's on SmolLM2-135M: time and perplexity on two texts, over several calibration
draws (issue 32).

    make llmcompressor-venv   # once: llm-compressor 0.14.0.1 lives in its own venv (it pins transformers ≤ 5.17)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gptq_peers.py --threads 1 --json out/bench/gptq_peers.json
    .venv/bin/python benchmarks/gptq_peers.py --table out/bench/gptq_peers.json

Protocol, per seed in ``--seeds`` (default 0 1 2): calibration = ``--windows`` × ``--seq-len`` tokens of
enwiki/calib cut by a3q.calib.windows.random_windows with that seed; the same token ids go to llm-compressor (one
window per sample, no shuffling). Evaluation: the first ``--eval-windows`` × 512 of enwiki/test and of the ``news``
corpus (a text nothing calibrates on); perplexity as a3q.metrics.perplexity (float64 cross-entropy, mean over every
predicted token), computed in each venv from its own model. Both tools run with ``--threads`` torch threads, one
after the other for each seed, in one command.

Time: a3q = its calibration pass (:func:`a3q.pipeline.runner.run_pipeline`: capture, observe forwards, Hessians,
GPTQ, packing and the forwards that hand each quantized layer's outputs on; not loading the model); llm-compressor =
``oneshot(...)`` (the same work in its sequential pipeline; not loading the model). The stage's own report seconds
(without the hand-on forwards) are kept too.

Settings, a3q (``--a3q-settings``): ``default`` (the stage's defaults) or options joined by ``+`` on top of plain
GPTQ: ``aga`` (act_group_aware), ``static`` (act_order: static), ``actorder`` (act_order: true), ``ts``
(true_sequential), ``damp<x>``, ``bs<n>`` (block_size). llm-compressor (``--llmc-settings``): ``default`` (its
GPTQModifier defaults: actorder static, dampening 0.01) or ``none``/``static``/``group``, optionally ``+damp<x>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import SMOLLM2_ALIAS, finish, machine_info, machine_line, wait_for_quiet, write_json

ROOT = Path(__file__).resolve().parent.parent
SIDE = Path(__file__).resolve().parent / "llmcompressor_side.py"
DEFAULT_PYTHON = ROOT / ".venv-llmcompressor" / "bin" / "python"


def a3q_fields(setting: str) -> dict:
    """``static+damp0.05`` → the gptq stage's fields; ``default`` → none (the stage's own defaults)."""
    if setting == "default":
        return {}
    fields: dict = {"act_group_aware": False, "act_order": False, "damp_percent": 0.01}
    for part in setting.split("+"):
        if part == "aga":
            fields["act_group_aware"] = True
        elif part in ("static", "actorder"):
            fields["act_order"] = "static" if part == "static" else True
        elif part == "ts":
            fields["true_sequential"] = True
        elif part == "mse":
            fields["mse"] = True
        elif part.startswith("damp"):
            fields["damp_percent"] = float(part[4:])
        elif part.startswith("bs"):
            fields["block_size"] = int(part[2:])
        elif part != "plain":
            raise SystemExit(f"unknown a3q setting part {part!r}")
    return fields


def llmc_arguments(setting: str) -> list[str]:
    parts = setting.split("+")
    out = ["--actorder", parts[0]]
    for part in parts[1:]:
        if not part.startswith("damp"):
            raise SystemExit(f"unknown llm-compressor setting part {part!r}")
        out += ["--damp", part[4:]]
    if parts[0] not in ("default", "none", "static", "weight", "group"):
        raise SystemExit(f"unknown llm-compressor actorder {parts[0]!r}")
    return out


def run_a3q(args, setting: str, seed: int, texts: dict, work: Path) -> dict:
    import a3q.session as session
    from a3q.engine import run_recipe
    from a3q.metrics.perplexity import perplexity
    from a3q.recipe import parse_recipe

    spent = {}
    original = session.run_pipeline

    def timed(*a, **k):  # noqa: ANN002, ANN003, ANN202
        started = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            spent["pass"] = time.perf_counter() - started

    session.run_pipeline = timed
    try:
        recipe = {"model": SMOLLM2_ALIAS, "checkpoint_every": 0,  # no per-layer checkpoint writes (llm-compressor has none)
                  "calibration": {"corpus": "enwiki", "split": "calib", "windows": args.windows,
                                  "seq_len": args.seq_len, "seed": seed},
                  "stages": [{"stage": "gptq", "bits": args.bits, "group_size": args.group_size,
                              **a3q_fields(setting)}]}
        result = run_recipe(parse_recipe(recipe), work / f"a3q-{setting}-{seed}", show_table=False)
    finally:
        session.run_pipeline = original
    row = next(r for r in result.report.rows if r["stage"] == "gptq")
    ppl = {name: perplexity(result.graph.model, ids, progress=False).perplexity for name, ids in texts.items()}
    return {"tool": "a3q", "setting": setting, "seed": seed, "seconds": spent["pass"], "stage_seconds": row["seconds"],
            "perplexity": ppl, "note": row.get("note", "")}


def run_llmc(args, setting: str, seed: int, files: dict, work: Path, console: Console) -> dict:
    out = work / f"llmc-{setting}-{seed}.json"
    log = work / f"llmc-{setting}-{seed}.log"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    command = [str(args.llmc_python), str(SIDE), "--model", str(files["model"]), "--calib", str(files[f"calib{seed}"]),
               "--eval", *(f"{name}={files[name]}" for name in ("enwiki", "news")), "--out", str(out),
               "--bits", str(args.bits), "--group-size", str(args.group_size), "--threads", str(args.threads),
               *llmc_arguments(setting)]
    console.log(f"llm-compressor {setting} seed {seed} → {log}")
    cwd = work / "llmc-cwd"
    cwd.mkdir(exist_ok=True)
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"llmcompressor_side.py failed (exit {done.returncode}):\n{tail}")
    result = json.loads(out.read_text())
    return {"tool": "llm-compressor", "setting": setting, "seed": seed, "seconds": result["seconds"],
            "perplexity": result["perplexity"], "note": f"actorder {result['settings']['actorder_resolved']}",
            "versions": result["versions"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--a3q-settings", nargs="+", default=["default"])
    parser.add_argument("--llmc-settings", nargs="+", default=["default"])
    parser.add_argument("--llmc-python", type=Path, default=DEFAULT_PYTHON)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--table", type=Path, nargs="+", default=None, help="only print the table of these JSON files")
    args = parser.parse_args()
    if args.table:
        for path in args.table:
            print_table(json.loads(path.read_text()))
        return
    for setting in args.a3q_settings:
        a3q_fields(setting)
    for setting in args.llmc_settings:
        llmc_arguments(setting)
    if args.llmc_settings and not args.llmc_python.is_file():
        raise SystemExit(f"{args.llmc_python} not found: run `make llmcompressor-venv` first (or --llmc-settings)")

    import torch
    from safetensors.torch import save_file

    from a3q.assets.models import smollm2_path
    from a3q.calib.sources import TextSource, enwiki
    from a3q.calib.windows import random_windows, sequential_windows
    from a3q.io.loading import load_graph
    from a3q.metrics.perplexity import perplexity

    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    info = machine_info("cpu")
    work = Path(tempfile.mkdtemp(prefix="a3q-gptq-peers-"))
    dense = load_graph(SMOLLM2_ALIAS)
    texts = {"enwiki": sequential_windows(dense.tokenizer, enwiki("test"), 512, args.eval_windows),
             "news": sequential_windows(dense.tokenizer, TextSource(corpus="news", split="all"), 512, args.eval_windows)}
    files = {"model": smollm2_path()}
    for name, ids in texts.items():
        files[name] = work / f"{name}.safetensors"
        save_file({"input_ids": ids.contiguous()}, str(files[name]))
    for seed in args.seeds:
        files[f"calib{seed}"] = work / f"calib{seed}.safetensors"
        calib = random_windows(dense.tokenizer, enwiki("calib"), args.seq_len, args.windows, seed)
        save_file({"input_ids": calib.contiguous()}, str(files[f"calib{seed}"]))
    rows = [{"tool": "dense fp32", "setting": "", "seed": None, "seconds": None,
             "perplexity": {name: perplexity(dense.model, ids, progress=False).perplexity for name, ids in texts.items()}}]
    del dense
    notes = [f"calibration {args.windows}×{args.seq_len} enwiki/calib, seeds {args.seeds}; eval first "
             f"{args.eval_windows}×512 of enwiki/test and of news; {args.bits}-bit g{args.group_size} symmetric",
             "seconds: a3q = calibration pass (run_pipeline), llm-compressor = oneshot(); neither loads the model"]
    for seed in args.seeds:
        for setting in args.a3q_settings:
            wait_for_quiet(console)
            rows.append(run_a3q(args, setting, seed, texts, work))
            console.log(rows[-1])
            partial(args, info, rows)
        for setting in args.llmc_settings:
            wait_for_quiet(console)
            rows.append(run_llmc(args, setting, seed, files, work, console))
            console.log(rows[-1])
            partial(args, info, rows)
    finish("gptq_peers", info, args, rows, notes, print_table)


def partial(args, info: dict, rows: list[dict]) -> None:
    """Keep what is measured so far (a long run interrupted still leaves its rows)."""
    if args.json:
        write_json(args.json, {"benchmark": "gptq_peers", "machine": info, "partial": True, "rows": rows})


def _summary(values: list[float], spec: str) -> str:
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} [{format(min(values), spec)}–{format(max(values), spec)}]"


def print_table(result: dict) -> None:
    rows = result["rows"]
    table = Table(title="GPTQ on SmolLM2-135M: a3q vs llm-compressor, mean [min–max] over seeds")
    for column in ["tool", "setting", "seeds", "seconds", "enwiki ppl", "news ppl", "note"]:
        table.add_column(column, justify="left" if column in ("tool", "setting", "note") else "right")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["tool"], row["setting"]), []).append(row)
    for (tool, setting), members in groups.items():
        seconds = [r["seconds"] for r in members if r["seconds"] is not None]
        table.add_row(tool, setting, ",".join(str(r["seed"]) for r in members if r["seed"] is not None),
                      _summary(seconds, ".1f") if seconds else "—",
                      _summary([r["perplexity"]["enwiki"] for r in members], ".2f"),
                      _summary([r["perplexity"]["news"] for r in members], ".2f"), members[0].get("note", "")[:60])
    console = Console(width=200)
    console.print(table)
    for note in result.get("notes", []):
        console.print(f"  {note}")
    console.print(machine_line(result["machine"]))


if __name__ == "__main__":
    main()
