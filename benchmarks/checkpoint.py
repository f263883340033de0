"""What checkpoints cost and what resuming saves: SmolLM2, A³ 20% + GPTQ 4-bit g64 in one layer-by-layer pass.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/checkpoint.py --threads 1 --json out/bench/checkpoint.json

Rows, each a real ``a3q run`` in its own process (so the wall time includes start-up and loading):

* ``off``: ``checkpoint_every: 0`` (no checkpoints);
* ``every layer``: the default; the report's checkpoint entry gives the seconds spent writing and the bytes written
  (per layer: one finished layer plus the next layer's inputs on both streams, A³'s dense one and GPTQ's sequential
  one, plus the stage states);
* ``stopped at 50%`` + ``resumed``: SIGTERM after layer 14 of 30, then ``--resume``: the resumed run's wall time
  against a full rerun is what a preempted job saves.

Calibration: ``--windows`` × ``--seq-len`` tokens of enwiki/calib. ``--gptq-attention-only`` (default on) skips the
MLP linears in GPTQ so the benchmark fits in minutes on two cores; the checkpoint's size does not depend on it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (add_a3_gptq_arguments, finish, machine_info, print_with_context,  # noqa: E402
                          run_a3q, write_a3_gptq_recipe)

LAYERS = 30
ROOT = Path(__file__).resolve().parents[1]


def run(recipe_path: Path, out: Path, threads: int, *flags: str, stop_at: str | None = None) -> dict:
    # a stop at a chosen point: the tests' stop hook (tests/stop_at.py), which reads the point from the environment
    env = {"A3Q_TEST_STOP_AT": stop_at, "PYTHONPATH": str(ROOT)} if stop_at else {}
    wall, report = run_a3q(recipe_path, out, *flags, threads=threads, env=env, ok=(0, 143),
                           module="tests.stop_at" if stop_at else "a3q.cli")
    pass_seconds = sum(row.get("seconds", 0) for row in report["stages"] if row["stage"] in ("a3", "gptq"))
    return {"wall_s": wall, "pass_s": pass_seconds, "status": report["status"], **report.get("checkpoint", {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_a3_gptq_arguments(parser, windows=32, seq_len=512, attention_only=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        off = write_a3_gptq_recipe(args, folder / "off.yaml", folder / "artifact-off", checkpoint_every=0)
        rows.append({"run": "off", **run(off, folder / "off", args.threads)})
        every = write_a3_gptq_recipe(args, folder / "every.yaml", folder / "artifact-every", checkpoint_every=1)
        rows.append({"run": "every layer", **run(every, folder / "every", args.threads)})
        rows.append({"run": "stopped at 50% (SIGTERM after layer 14)",
                     **run(every, folder / "resumed", args.threads, stop_at="group0.layer14:TERM")})
        rows.append({"run": "resumed (--resume)", **run(every, folder / "resumed", args.threads, "--resume")})
    every_layer = rows[1]
    notes = [f"per layer: {every_layer['bytes_written'] / LAYERS / 2**20:.1f} MiB written, "
             f"{every_layer['seconds'] / LAYERS:.3f} s (the group checkpoint of the finished model included)",
             f"resuming at 50% took {rows[3]['wall_s']:.0f} s against {rows[1]['wall_s']:.0f} s for a whole run"]

    def render(result: dict) -> None:
        table = Table(title="Checkpoints: SmolLM2, A³ 20% + GPTQ 4-bit g64, one pass")
        for column in ("run", "wall s", "pass s", "checkpoint writes", "checkpoint s", "MiB written"):
            table.add_column(column, justify="left" if column == "run" else "right")
        for row in result["rows"]:
            table.add_row(row["run"], f"{row['wall_s']:.1f}", f"{row['pass_s']:.1f}", str(row.get("writes", 0)),
                          f"{row.get('seconds', 0):.2f}", f"{row.get('bytes_written', 0) / 2**20:.0f}")
        print_with_context(table, result)

    finish("checkpoint", machine_info("cpu"), args, rows, notes, render)


if __name__ == "__main__":
    main()
