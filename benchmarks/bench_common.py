"""Helpers shared by the benchmark scripts: machine description, timing, peak memory, model shapes.

Why a separate module: both scripts must describe the machine the same way (a number without its
CPU/GPU, thread count and load is not comparable) and build the *same* LLaMA-3.1-8B shape, so the
A³-speed and inference numbers can be read together.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

SHAPES = ("smollm2", "llama-3.1-8b")
SMOLLM2_ALIAS = "smollm2-135m"

# LLaMA-3.1-8B (config.json of meta-llama/Llama-3.1-8B): the timing shape, never its weights.
LLAMA31_8B: dict[str, Any] = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
RANDOM_WEIGHTS_NOTE = (
    "LLaMA-3.1-8B *shape* with RANDOM weights: a timing shape, not a quality result"
)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(device: str) -> dict[str, Any]:
    """What a reader needs to compare two runs: hardware, threads, versions, date and current load.

    The load average is recorded because this machine may be shared: a high value at start means
    another process competed for the cores and the timings are pessimistic.
    """
    import transformers

    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One line for the console, printed with every table."""
    hardware = info.get("gpu") or info["cpu"]
    return (
        f"{info['date']} | {info['device']}: {hardware} | CPU: {info['cpu']} ({info['cpu_count']} cores) | "
        f"torch threads {info['torch_threads']} | torch {info['torch']} | transformers {info['transformers']} | "
        f"load avg (1 min) at start {info['load_average_1m']}"
    )


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers the kernels and not just their launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def reset_peak_memory(device: str) -> bool:
    """Start a new peak-memory window; False where the OS does not allow resetting VmHWM.

    On Linux, writing ``5`` to /proc/self/clear_refs resets the RSS high-water mark, so the
    reported CPU peak covers the timed pass (plus what was already resident), not model loading.
    """
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_bytes(device: str) -> int:
    """GPU: peak bytes allocated by torch; CPU: the process's peak RSS (VmHWM)."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def llama31_8b_config(
    layers: int | None = None, hidden_size: int | None = None, vocab_size: int | None = None
):
    """LlamaConfig of the LLaMA-3.1-8B shape, optionally with fewer layers or a narrower model.

    A narrower model (``hidden_size``, a multiple of 128) keeps what matters to kernels and to A³:
    head_dim 128, 4 query heads per KV head, and intermediate = 3.5 × hidden.
    """
    from transformers import LlamaConfig

    shape = dict(LLAMA31_8B)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    if hidden_size is not None and hidden_size != shape["hidden_size"]:
        if hidden_size % 128:
            raise ValueError("--hidden-size must be a multiple of the head dim, 128")
        heads = hidden_size // 128
        shape.update(
            hidden_size=hidden_size,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 4),
            intermediate_size=int(3.5 * hidden_size),
        )
    if vocab_size is not None:
        shape["vocab_size"] = vocab_size
    return LlamaConfig(**shape, attn_implementation="sdpa")


def random_model(model_cls: Any, config: Any, device: str, dtype: torch.dtype) -> Any:
    """Instantiate ``model_cls`` with Hugging Face's random init directly on ``device`` in ``dtype``.

    Built under the device context so an 8B-shape model never has to fit in host memory.
    """
    with torch.device(device):
        model = model_cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def is_reduced(config: Any) -> bool:
    """True when a built 8B-shape config is narrower, shallower or has a smaller vocabulary."""
    return any(getattr(config, key) != LLAMA31_8B[key] for key in ("hidden_size", "num_hidden_layers", "vocab_size"))


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write the result as indented JSON (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def wait_for_quiet(console: Any = None) -> None:
    """Block while the shared machine's quiet flag exists (``$A3Q_QUIET_FILE``, default ``/tmp/a3q-quiet``): another
    session is timing something, and a timing taken beside it would have to be repeated."""
    import time

    flag = Path(os.environ.get("A3Q_QUIET_FILE", "/tmp/a3q-quiet"))
    if flag.exists() and console is not None:
        console.log(f"waiting while {flag} exists")
    while flag.exists():
        time.sleep(15)


def finish(
    benchmark: str, machine: str, args: Any, rows: list[dict[str, Any]], notes: list[str], render: Any
) -> dict[str, Any]:
    """Assemble a benchmark's result, print it with ``render`` and write ``--json`` if asked."""
    notes.append("shared machine: other processes may compete for the cores; see the load average above")
    result = {
        "benchmark": benchmark,
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "notes": notes,
    }
    render(result)
    if args.json:
        write_json(args.json, result)
    return result


def default_dtype(device: str, shape: str) -> str:
    """float32 for SmolLM2 on CPU (the real model's dtype there); bfloat16 on GPU and for the 8B shape."""
    return "float32" if shape == "smollm2" and not device.startswith("cuda") else "bfloat16"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def print_with_context(table: Any, result: dict[str, Any]) -> None:
    """Print a result table followed by the machine line and the notes (every number needs both)."""
    from rich.console import Console

    console = Console()
    console.print(table)
    console.print(machine_line(result["machine"]))
    for note in result["notes"]:
        console.print(f"• {note}")


def add_a3_gptq_arguments(parser: Any, windows: int, seq_len: int, attention_only: bool) -> None:
    """The options of the benchmarks that run SmolLM2 through A³ 20% + GPTQ 4-bit g64 as ``a3q run`` processes."""
    import argparse

    parser.add_argument("--windows", type=int, default=windows, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=seq_len, help="tokens per calibration window")
    parser.add_argument("--gptq-attention-only", action=argparse.BooleanOptionalAction, default=attention_only,
                        help="skip the MLP linears in GPTQ (shorter)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")


def write_a3_gptq_recipe(args: Any, path: Path, artifact: Path, **header: Any) -> Path:
    """SmolLM2, A³ 20% + GPTQ 4-bit g64 (one pass) + export, at ``args``' calibration; ``header`` adds fields."""
    import yaml

    gptq: dict[str, Any] = {"stage": "gptq", "bits": 4, "group_size": 64}
    if args.gptq_attention_only:
        gptq["skip_modules"] = ["mlp."]
    path.write_text(yaml.safe_dump({
        "model": SMOLLM2_ALIAS, **header,
        "calibration": {"windows": args.windows, "seq_len": args.seq_len, "seed": 0},
        "stages": [{"stage": "a3", "ratio": 0.2}, gptq, {"stage": "export", "path": str(artifact)}],
    }))
    return path


def run_a3q(recipe: Path, out: Path, *flags: str, threads: int = 1, env: dict[str, str] | None = None,
            ok: tuple[int, ...] = (0,), module: str = "a3q.cli") -> tuple[float, dict[str, Any]]:
    """``a3q run RECIPE --out OUT FLAGS`` in a fresh process: its wall seconds and its report.json. ``module``: the
    command line to run (``tests.stop_at``: a3q's, stopped at a chosen point; run from the repository root)."""
    import subprocess
    import sys
    import time

    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(env or {})}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module, "run", str(recipe), "--out", str(out), *flags],
                          env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode not in ok:
        raise SystemExit(done.stderr[-3000:])
    return wall, json.loads((out / "report.json").read_text())
