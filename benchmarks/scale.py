"""Models bigger than memory: peak RSS of an offloaded run against the model's size, and the memory model at scale.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scale.py --json out/bench/scale.json

A Llama model of the Llama-3.2-1B shape (16 layers, hidden 2048, 32/8 heads, head dim 64, intermediate 8192) with
RANDOM weights, saved once in bfloat16 (this measures memory and time, not quality), with SmolLM2's tokenizer and
vocabulary (``--vocab`` shrinks it: token ids are then folded into it). Each row is a real ``a3q run`` in its own
process: A³ 20% + GPTQ 4-bit g128 + export, ``offload: disk`` and ``offload: none``. Peak RSS is the largest of the
report's per-stage peaks (VmHWM, reset per stage) and the child's ru_maxrss.

The second table is the memory model (:mod:`a3q.preflight` with ``offload: disk``) for the 8B and 70B shapes: what
stays resident (runtime, embeddings and LM head, two copies of the largest layer, activations, one layer's
statistics, workspace) against the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import finish, machine_info, print_with_context, run_a3q  # noqa: E402

LLAMA32_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
              "head_dim": 64, "intermediate_size": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 131072, "tie_word_embeddings": True}
SHAPES_ON_PAPER = {
    "Llama-3.1-8B": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 128256,
                     "tie_word_embeddings": False},
    "Llama-3.1-70B": {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                      "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 28672, "vocab_size": 128256,
                      "tie_word_embeddings": False},
}
_MIB = 1 << 20


def build_model(folder: Path, vocab: int | None) -> int:
    """Save the random 1B-shape model (bf16) and SmolLM2's tokenizer into ``folder`` once; return its bytes."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from a3q.assets.models import resolve_model_path

    if not (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path("smollm2-135m")))
        config = LlamaConfig(**LLAMA32_1B, vocab_size=vocab or len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # HF init: normal(0, 0.02) weights, unit norms
        model.save_pretrained(folder, max_shard_size="5GB")
        tokenizer.save_pretrained(folder)
        del model
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def run(model: Path, folder: Path, offload: str, args: argparse.Namespace) -> dict:
    recipe = folder / f"{offload}.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(model), "device": "cpu", "dtype": args.dtype, "offload": offload,
        "calibration": {"windows": args.windows, "seq_len": args.seq_len, "seed": 0},
        "stages": [{"stage": "a3", "ratio": 0.2}, {"stage": "gptq", "bits": 4, "group_size": 128},
                   {"stage": "export", "path": str(folder / f"artifact-{offload}"), "max_shard_size": "500MB"}]}))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    wall, report = run_a3q(recipe, folder / offload, threads=args.threads)
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    stage_peaks = {row["stage"]: row.get("peak_rss_mb", 0) for row in report["stages"]}
    peak = max(list(stage_peaks.values()) + ([child_peak / 1024] if child_peak > before else []))
    layers = LLAMA32_1B["num_hidden_layers"]
    pass_seconds = sum(row.get("seconds", 0) for row in report["stages"] if row["stage"] in ("a3", "gptq"))
    return {"offload": offload, "wall_s": round(wall, 1), "s_per_layer": round(pass_seconds / layers, 2),
            "peak_rss_mib": round(peak, 1), "stage_peaks_mib": stage_peaks,
            "artifact_mib": round(sum(p.stat().st_size for p in (folder / f"artifact-{offload}").glob("*.safetensors"))
                                  / _MIB, 1)}


def memory_model(dtype: str, windows: int, seq_len: int) -> list[dict]:
    """The offloaded run's estimated resident memory for the 8B and 70B shapes (no weights needed)."""
    from a3q.preflight import RUNTIME_BYTES, layer_statistics_bytes

    width = 4 if dtype == "float32" else 2
    rows = []
    for name, shape in SHAPES_ON_PAPER.items():
        hidden, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
        q = shape["num_attention_heads"] * shape["head_dim"]
        kv = shape["num_key_value_heads"] * shape["head_dim"]
        layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter
        outside = shape["vocab_size"] * hidden * (1 if shape["tie_word_embeddings"] else 2)
        checkpoint = (layer * layers + outside) * 2  # bf16 on disk
        parts = {"runtime": RUNTIME_BYTES, "embeddings + LM head": outside * width, "two layers": 2 * layer * width,
                 "activations": 2 * windows * seq_len * hidden * width,
                 "statistics": layer_statistics_bytes(hidden, inter)}
        total = sum(parts.values())
        rows.append({"shape": name, "checkpoint_gib": round(checkpoint / 2**30, 1),
                     **{k: round(v / 2**30, 2) for k, v in parts.items()},
                     "resident_gib": round(total / 2**30, 2), "of_checkpoint": round(total / checkpoint, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the tokenizer's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=Path(".cache/bench/llama-3.2-1b-shape"))
    parser.add_argument("--only", choices=("disk", "none"), default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.model_dir.mkdir(parents=True, exist_ok=True)
    size = build_model(args.model_dir, args.vocab)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for offload in [args.only] if args.only else ["disk", "none"]:
            row = run(args.model_dir, Path(tmp), offload, args)
            row["of_checkpoint"] = round(row["peak_rss_mib"] * _MIB / size, 3)
            rows.append(row)
    notes = [f"Llama-3.2-1B shape, RANDOM bf16 weights ({size / 2**30:.2f} GiB on disk); working dtype {args.dtype}; "
             f"calibration {args.windows}x{args.seq_len}"]
    if len(rows) == 2:
        notes.append(f"offloaded peak RSS = {rows[0]['peak_rss_mib'] / rows[1]['peak_rss_mib']:.2f} x in-memory")
    # the memory model in both working dtypes: float32 (a3q's CPU default) and bfloat16 (dtype: auto on a GPU)
    model_rows = {dtype: memory_model(dtype, args.windows, args.seq_len) for dtype in ("float32", "bfloat16")}
    finish("scale", machine_info("cpu"), args, rows, notes, lambda result: render({**result, "memory_model": model_rows}))
    if args.json:  # finish wrote the rows; add the memory model
        result = json.loads(args.json.read_text())
        args.json.write_text(json.dumps({**result, "memory_model": model_rows}, indent=2) + "\n")


def render(result: dict) -> None:
    table = Table(title="A³ 20% + GPTQ 4-bit + export, Llama-3.2-1B shape (random weights)")
    for column in ("offload", "wall s", "s/layer", "peak RSS MiB", "of checkpoint", "artifact MiB"):
        table.add_column(column)
    for row in result["rows"]:
        table.add_row(row["offload"], f"{row['wall_s']:.0f}", f"{row['s_per_layer']:.1f}",
                      f"{row['peak_rss_mib']:.0f}", f"{row['of_checkpoint']:.0%}", f"{row['artifact_mib']:.0f}")
    print_with_context(table, result)
    from rich.console import Console

    for dtype, rows in result.get("memory_model", {}).items():
        model = Table(title=f"offload: disk, resident memory model (GiB) at scale, working dtype {dtype}")
        keys = [k for k in rows[0] if k != "shape"]
        model.add_column("shape")
        for key in keys:
            model.add_column(key)
        for row in rows:
            model.add_row(row["shape"], *[f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keys])
        Console(width=160).print(model)


if __name__ == "__main__":
    main()
