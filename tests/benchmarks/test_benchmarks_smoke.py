"""Smoke tests of the benchmark scripts: every code path runs and writes the JSON it promises.

Why no timing assertions: timings depend on the machine and its load; they belong in the benchmark
output, not in pass/fail tests. These runs use the tiniest settings (a 256-wide, 1–2 layer LLaMA-3.1-8B
*shape*, a few tokens) so the whole file takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# One torch thread: on a shared 2-core machine, LAPACK calls on small matrices with 2 OpenMP threads
# were measured 15-25x slower under contention (A³ decomposition of SmolLM2: 1.5 s vs 24-36 s).
ONE_THREAD = ["--threads", "1"]
TINY_8B = [*ONE_THREAD, "--shape", "llama-3.1-8b", "--hidden-size", "256", "--vocab-size", "1024"]


@pytest.fixture(autouse=True)
def restore_threads():
    """The scripts set torch's thread count (--threads); give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def load_script(name: str):
    """Import ``benchmarks/<name>.py`` as a module (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def read(path: Path) -> dict:
    result = json.loads(path.read_text())
    assert {"benchmark", "machine", "settings", "rows", "notes"} <= result.keys()
    assert {"date", "device", "cpu", "torch_threads"} <= result["machine"].keys()
    return result


def test_a3_speed_tiny_8b_shape(tmp_path: Path) -> None:
    out = tmp_path / "a3_speed.json"
    load_script("a3_speed").main([*TINY_8B, "--layers", "1", "--windows", "1", "--seq-len", "64", "--json", str(out)])
    result = read(out)
    assert [row["extrapolated"] for row in result["rows"]] == [False, True]  # measured 1 layer, then ×32
    measured, extrapolated = result["rows"]
    for key in ("calibration_s", "decomposition_s", "total_s", "peak_memory_bytes", "calibration_tokens", "paper_total_s"):
        assert positive(measured[key]), key
    assert measured["calibration_tokens"] == 64 and extrapolated["layers"] == 32
    assert extrapolated["total_s"] == pytest.approx(32 * measured["total_s"])
    assert 0.19 < measured["achieved_ratio"] < 0.3
    assert any("RANDOM weights" in note for note in result["notes"])


def test_inference_tiny_8b_shape(tmp_path: Path) -> None:
    out = tmp_path / "inference.json"
    load_script("inference").main([
        *TINY_8B, "--layers", "2", "--batch", "2", "--prefill", "16", "--decode", "3", "--repeats", "1",
        "--rank-multiple", "1", "32", "--json", str(out),
    ])
    rows = read(out)["rows"]
    assert [row["rank_multiple"] for row in rows] == [None, 1, 32]
    for row in rows:
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decoder_linear_params", "kv_bytes_per_token"):
            assert positive(row[key]), key
    dense, a3_1, a3_32 = rows
    assert (dense["qk_head_dim"], dense["vo_head_dim"], dense["intermediate_size"]) == (128, 128, 896)
    assert (a3_1["qk_head_dim"], a3_1["vo_head_dim"]) == (102, 102)
    assert a3_32["qk_head_dim"] % 32 == 0 and a3_32["intermediate_size"] % 32 == 0
    assert a3_1["kv_bytes_per_token"] < dense["kv_bytes_per_token"]
    assert a3_1["decoder_linear_params"] < dense["decoder_linear_params"]


def test_inference_tiny_smollm2_real_a3(tmp_path: Path) -> None:
    """The default model's path: real SmolLM2 and a real (tiny-calibration) A³ compression."""
    out = tmp_path / "inference_smollm2.json"
    load_script("inference").main([
        *ONE_THREAD, "--prefill", "16", "--decode", "2", "--repeats", "1", "--warmup", "0",
        "--calib-windows", "1", "--calib-seq-len", "32", "--rank-multiple", "8", "--json", str(out),
    ])
    rows = read(out)["rows"]
    assert [row["rank_multiple"] for row in rows] == [None, 8]
    assert (rows[1]["qk_head_dim"], rows[1]["vo_head_dim"], rows[1]["intermediate_size"]) == (48, 48, 1224)
    for row in rows:
        assert positive(row["prefill_tokens_per_s"]) and positive(row["decode_tokens_per_s"])


def test_search_tiny(tmp_path: Path) -> None:
    out = tmp_path / "search.json"
    load_script("search").main([*ONE_THREAD, "--tiny", "--skip-references", "--budgets", "0.3", "--calib-windows", "2",
                                "--eval-windows", "2", "--out", str(tmp_path / "runs"), "--json", str(out)])
    (row,) = read(out)["rows"]
    assert row["pick"] is not None and row["pick_bits"] <= 16 * 0.3 and positive(row["pick_ppl"])
    assert 1 <= row["built"] <= 4 and (tmp_path / "runs" / "tiny" / "search-0.3" / "best.yaml").is_file()
