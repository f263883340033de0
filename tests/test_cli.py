"""End to end through the command line: run a recipe, evaluate, inspect (real model, small budgets)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from a3q.cli import app

runner = CliRunner()


def test_run_recipe_then_eval_and_inspect_the_artifact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = {
        "model": "smollm2-135m",
        "calibration": {"corpus": "enwiki", "split": "calib", "windows": 4, "seq_len": 128, "seed": 0},
        "stages": [
            {"stage": "evaluate", "split": "test", "seq_len": 128, "max_windows": 2},
            {"stage": "a3", "allocation": "uniform", "ratio": 0.2},
            {"stage": "evaluate", "split": "test", "seq_len": 128, "max_windows": 2},
            {"stage": "export", "path": "artifacts/a3-20"},
            {"stage": "reload"},
            {"stage": "evaluate", "split": "test", "seq_len": 128, "max_windows": 2},
        ],
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", "recipe.yaml", "--out", "run"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rows = report["stages"]
    assert [row["stage"] for row in rows] == ["load", "evaluate", "a3", "evaluate", "export", "reload", "evaluate"]
    dense, compressed, reloaded = rows[1]["ppl"], rows[3]["ppl"], rows[6]["ppl"]
    assert dense < compressed and reloaded == compressed
    assert 0.2 <= rows[2]["achieved_ratio"] < 0.22
    assert rows[2]["params"] < 0.8 * rows[0]["params"] * 1.0001
    assert rows[2]["kv_bytes_per_token"] < rows[0]["kv_bytes_per_token"]
    assert all(row["seconds"] >= 0 and row["peak_rss_mb"] > 0 for row in rows)
    manifest = json.loads((tmp_path / "artifacts" / "a3-20" / "a3q.json").read_text())
    assert manifest["recipe"] == recipe and [r["stage"] for r in manifest["report"]] == ["load", "evaluate", "a3", "evaluate"]
    assert [h["stage"] for h in manifest["structure"]["history"]] == ["evaluate", "a3", "evaluate"]
    assert manifest["structure"]["history"][1]["config"]["ratio"] == 0.2

    result = runner.invoke(app, ["eval", "artifacts/a3-20", "--seq-len", "128", "--max-windows", "2", "--json", "eval.json"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["perplexity"] == reloaded
    result = runner.invoke(app, ["eval", "artifacts/a3-20", "--seq-len", "128", "--max-windows", "2", "--offload", "cpu",
                                 "--json", "eval-offloaded.json"])  # layer by layer: the same number
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval-offloaded.json").read_text())["perplexity"] == pytest.approx(reloaded, rel=1e-9)

    result = runner.invoke(app, ["inspect", "artifacts/a3-20"])
    assert result.exit_code == 0, result.output
    assert "a3q_llama" in result.output and "a3q artifact" in result.output

    # a3q serve: the artifact is checked here, then vLLM's server would run from the serve venv (a stand-in here)
    fake_python = tmp_path / "serve-venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.write_text("#!/bin/sh\n")
    fake_python.chmod(0o755)
    monkeypatch.setenv("A3Q_SERVE_VENV", str(fake_python.parents[1]))
    result = runner.invoke(app, ["serve", "artifacts/a3-20", "--port", "8123", "--dry-run", "--", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert f"{fake_python} -m vllm.entrypoints.openai.api_server --model artifacts/a3-20 --port 8123 --dtype " \
           f"float32" in result.output
    (tmp_path / "artifacts" / "a3-20" / "config.json").write_text("{}")
    result = runner.invoke(app, ["serve", "artifacts/a3-20", "--dry-run"])
    assert result.exit_code == 2 and "refusing to serve" in result.output and "config.json" in result.output


def test_invalid_recipe_fails_before_loading_and_names_the_field(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: smollm2-135m\nstages:\n  - stage: a3\n    ratio: 1.5\n")
    result = runner.invoke(app, ["run", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2
    assert "stages[0] (a3): ratio" in result.output
    assert not (tmp_path / "out").exists()


def test_an_unfinished_checkpoint_is_neither_overwritten_nor_resumed_blindly(tmp_path, monkeypatch):
    """Refused before the model loads, in one line each: a rerun onto an unfinished run's checkpoint, --resume of a
    folder with none, and --resume with --restart."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"model": "smollm2-135m", "stages": [{"stage": "a3", "ratio": 0.2}]}))
    result = runner.invoke(app, ["run", "recipe.yaml", "--out", "empty", "--resume"])
    assert result.exit_code == 2 and "no checkpoint in" in result.output
    assert json.loads((tmp_path / "empty" / "report.json").read_text())["status"] == "failed"
    checkpoint = tmp_path / "run" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / ".a3q-checkpoint").touch()
    (checkpoint / "checkpoint.json").write_text(json.dumps({"format": 1, "position": "after layer 3 of stages[0] (a3)"}))
    result = runner.invoke(app, ["run", "recipe.yaml", "--out", "run"])
    assert result.exit_code == 2
    assert "holds the checkpoint of an unfinished run (after layer 3 of stages[0] (a3)): --resume continues it" in \
        " ".join(result.output.split())
    assert (checkpoint / "checkpoint.json").is_file()
    result = runner.invoke(app, ["run", "recipe.yaml", "--out", "run", "--resume", "--restart"])
    assert result.exit_code == 2 and "exclude each other" in result.output
