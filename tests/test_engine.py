"""The engine's own jobs, on the real SmolLM2: repeating the quality measurement around a training stage, and one
report row per stage of a shared calibration pass."""

from __future__ import annotations

import json

from a3q.engine import run_recipe
from a3q.recipe import parse_recipe

EVALUATE = {"stage": "evaluate", "split": "test", "seq_len": 64, "max_windows": 2}


def test_training_stage_gets_before_and_after_perplexity_from_the_engine(tmp_path):
    recipe = parse_recipe({"model": "smollm2-135m", "stages": [
        EVALUATE, {"stage": "lora", "r": 2, "steps": 3, "seq_len": 32, "lr": 1e-2},
    ]})
    rows = run_recipe(recipe, tmp_path / "run", show_table=False).report.rows
    evaluate, lora = rows[1], rows[2]
    assert lora["ppl_before"] == evaluate["ppl"]
    assert lora["ppl"] != evaluate["ppl"] and lora["eval"]["windows"] == 2
    assert "→" in lora["note"] and lora["steps"] == 3


def test_a_shared_pass_reports_a_row_per_stage(tmp_path):
    recipe = parse_recipe({
        "model": "smollm2-135m", "calibration": {"windows": 2, "seq_len": 64},
        "stages": [{"stage": "a3", "allocation": "uniform", "ratio": 0.2, "statistics": "sequential", "components": ["mlp"]},
                   {"stage": "gptq", "bits": 8, "group_size": 64, "skip_modules": ["layers.1."]}],
    })
    run_recipe(recipe, tmp_path / "run", show_table=False)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "complete"
    load, a3, gptq = report["stages"]
    assert a3["shared_pass_with"] == ["stages[1] (gptq)"] and gptq["shared_pass_with"] == ["stages[0] (a3)"]
    assert a3["statistics"] == "sequential" and a3["params"] < load["params"]
    assert gptq["quantized_linears"] == 7 * 29 and gptq["weight_bytes"] < a3["weight_bytes"]
    assert gptq["shared_pass_seconds"] >= a3["seconds"] + gptq["seconds"] - 1e-6
