"""Where a3q's GPTQ stage spends its time on SmolLM2-135M, per part and per layer (issue 32).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gptq_profile.py --threads 1 --settings aga aga+ts \\
        --json out/bench/gptq_profile.json

Runs the recipe ``gptq`` stage (calibration ``--windows`` × ``--seq-len`` enwiki/calib, seed 0, 4-bit g64) with
wall-clock timers wrapped around the functions it calls; nothing else changes. Parts:

* capture: the embeddings pass that records layer 0's inputs (:func:`a3q.pipeline.runner.capture_layer_inputs`);
* observe forwards: each layer's forward with the Hessian hooks, Hessian accumulation excluded;
* Hessian: :meth:`HessianAccumulator.add` (the float64 ``XᵀX`` per batch) and ``take_hessian``;
* true-sequential re-forwards: the extra partial forwards of later rounds (accumulation excluded);
* order, damp + Cholesky + inverse, lazy updates (:func:`a3q.quant.gptq.lazy_update`), relative error: inside
  ``gptq_quantize``; "column loop" is the rest of ``gptq_quantize`` (reordering H and W, the per-column quantize and
  rank-1 updates, group parameters);
* packing: :meth:`GPTQLinear.set_codes`; propagate: the forward that hands the quantized layer's outputs on.

Nested timers are subtracted from their parents, so the parts add up to the total.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import SMOLLM2_ALIAS, machine_info, machine_line, wait_for_quiet, write_json

PARTS = ["capture", "observe forwards", "Hessian XᵀX (float64)", "true-sequential re-forwards", "order",
         "damp + Cholesky + inverse", "column loop", "lazy updates", "relative error", "packing", "propagate"]


class Timers:
    """Exclusive wall-clock time per part: time spent in a nested timer is not counted in its parent."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []

    def wrap(self, part, function):  # noqa: ANN001, ANN201 (any callable)
        def timed(*args, **kwargs):
            name = part(*args, **kwargs) if callable(part) else part
            self.stack.append([name, time.perf_counter(), 0.0])
            try:
                return function(*args, **kwargs)
            finally:
                name, started, nested = self.stack.pop()
                spent = time.perf_counter() - started
                self.total[name] += spent - nested
                if self.stack:
                    self.stack[-1][2] += spent
        return timed


def instrument(timers: Timers) -> None:
    """Wrap the functions the gptq stage calls (module globals, so the callers pick the wrappers up)."""
    import a3q.pipeline.runner as runner
    import a3q.quant.gptq as gptq
    import a3q.stages.gptq as stage
    from a3q.quant.gptq_linear import GPTQLinear

    state = {"round": "observe"}
    original_process = stage.GPTQStage.process

    def process(self, graph, index):  # noqa: ANN001, ANN202
        more = original_process(self, graph, index)
        state["round"] = "true-sequential re-forwards" if more else "observe"
        return more

    stage.GPTQStage.process = process

    def forward_part(layer, index, inputs, handles=()):  # noqa: ANN001, ANN202
        return (state["round"] if state["round"] != "observe" else "observe forwards") if handles else "propagate"

    runner.run_layer = timers.wrap(forward_part, runner.run_layer)
    runner.capture_layer_inputs = timers.wrap("capture", runner.capture_layer_inputs)
    gptq.HessianAccumulator.add = timers.wrap("Hessian XᵀX (float64)", gptq.HessianAccumulator.add)
    gptq.HessianAccumulator.take_hessian = timers.wrap("Hessian XᵀX (float64)", gptq.HessianAccumulator.take_hessian)
    gptq.processing_order = timers.wrap("order", gptq.processing_order)
    gptq.damped_inverse_factor = timers.wrap("damp + Cholesky + inverse", gptq.damped_inverse_factor)
    if hasattr(gptq, "lazy_update"):  # absent before issue 32: the lazy updates then count in the column loop
        gptq.lazy_update = timers.wrap("lazy updates", gptq.lazy_update)
    gptq.weighted_relative_error = timers.wrap("relative error", gptq.weighted_relative_error)
    stage.gptq_quantize = timers.wrap("column loop", gptq.gptq_quantize)
    GPTQLinear.set_codes = timers.wrap("packing", GPTQLinear.set_codes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--settings", nargs="+", default=["aga"],
                        help="joined by +: aga, ts, static, actorder, plain, damp<x>, bs<n> (block size)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from a3q.engine import run_recipe
    from a3q.recipe import parse_recipe

    torch.set_num_threads(args.threads)
    timers = Timers()
    instrument(timers)
    info = machine_info("cpu")
    results = []
    for setting in args.settings:
        fields: dict = {"act_group_aware": False, "damp_percent": 0.05}
        for part in setting.split("+"):
            if part == "aga":
                fields["act_group_aware"] = True
            elif part == "ts":
                fields["true_sequential"] = True
            elif part == "mse":
                fields["mse"] = True
            elif part in ("static", "actorder"):
                fields["act_order"] = "static" if part == "static" else True
            elif part.startswith("damp"):
                fields["damp_percent"] = float(part[4:])
            elif part.startswith("bs"):
                fields["block_size"] = int(part[2:])
            elif part != "plain":
                raise SystemExit(f"unknown setting part {part!r}")
        recipe = {"model": SMOLLM2_ALIAS, "checkpoint_every": 0,
                  "calibration": {"corpus": "enwiki", "split": "calib", "windows": args.windows,
                                  "seq_len": args.seq_len, "seed": 0},
                  "stages": [{"stage": "gptq", "bits": 4, "group_size": 64, **fields}]}
        wait_for_quiet()
        timers.total.clear()
        started = time.perf_counter()
        result = run_recipe(parse_recipe(recipe), Path(tempfile.mkdtemp(prefix="a3q-gptq-profile-")), show_table=False)
        wall = time.perf_counter() - started
        row = next(r for r in result.report.rows if r["stage"] == "gptq")
        parts = {part: timers.total.get(part, 0.0) for part in PARTS}
        results.append({"setting": setting, "fields": fields, "stage_seconds": row["seconds"], "wall": wall,
                        "parts": parts, "layers": len(result.graph.layers)})
        print(f"\n{setting}: stage {row['seconds']:.1f} s, recipe wall {wall:.1f} s", flush=True)
        for part in PARTS:
            print(f"  {part:32s} {parts[part]:7.2f} s  {parts[part] / len(result.graph.layers) * 1000:8.1f} ms/layer")
        if args.json:
            write_json(args.json, {"benchmark": "gptq_profile", "machine": info, "rows": results})
    print(machine_line(info))


if __name__ == "__main__":
    main()
