"""Killed, stopped and resumed runs on the real model give the same artifact as an uninterrupted run.

One chain of subprocesses, each a real ``a3q run`` of SmolLM2 (A³ 20% + GPTQ 4-bit, one shared layer-by-layer pass,
then export), stopped at chosen points by :mod:`tests.stop_at`:

1. SIGTERM after layer 7 (checkpoints only every 100 layers, so the one written is the stop's own): exit 143, one
   line saying how to resume;
2. ``--resume`` with checkpoints after every layer: SIGKILL right after the checkpoint of layer 18;
3. ``--resume``: SIGKILL right after the checkpoint of the completed pass (group 0);
4. ``--resume``: finishes (the export).

The artifact's tensors must equal those of an uninterrupted run exactly. GPTQ skips the MLP linears to keep the
chain short: the per-layer state it checkpoints (errors, damping, quantized paths) is the same either way.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import tests.stop_at as stop_at_module

ROOT = Path(__file__).resolve().parents[2]

RECIPE = {
    "model": "smollm2-135m",
    "calibration": {"windows": 4, "seq_len": 128},
    "stages": [
        {"stage": "a3", "allocation": "uniform", "ratio": 0.2},
        {"stage": "gptq", "bits": 4, "group_size": 64, "skip_modules": ["mlp."]},
        {"stage": "export", "path": "ARTIFACT"},
    ],
}


def _run(recipe: Path, out: Path, *flags: str, stop_at: str | None = None) -> subprocess.CompletedProcess:
    """``a3q run`` in a child process, stopped at ``stop_at`` (:mod:`tests.stop_at`)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop(stop_at_module.VARIABLE, None)
    if stop_at:
        env[stop_at_module.VARIABLE] = stop_at
    return subprocess.run(stop_at_module.command("run", str(recipe), "--out", str(out), *flags),
                          env=env, capture_output=True, text=True, timeout=900)


def _recipe(tmp_path: Path, name: str, artifact: str | None = None, **header) -> Path:
    artifact = str(tmp_path / f"{artifact or name}-artifact")
    recipe = json.loads(json.dumps(RECIPE).replace("ARTIFACT", artifact))
    recipe.update(header)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _tensors(artifact: Path) -> dict:
    tensors = {}
    for file in sorted(artifact.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.slow
def test_stopped_killed_and_resumed_run_equals_uninterrupted(tmp_path, smollm2_path):
    reference = _run(_recipe(tmp_path, "reference"), tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    # the chain writes the same artifact path each time: the recipe must not change between a run and its resume
    recipe = _recipe(tmp_path, "chain", checkpoint_every=100)
    out = tmp_path / "chain"
    stopped = _run(recipe, out, stop_at="group0.layer7:TERM")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "stopped by SIGTERM after layer 7" in stopped.stderr
    assert f"resume with: a3q run {recipe} --out {out} --resume" in " ".join(stopped.stderr.split())
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "stopped"
    manifest = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert manifest["pass"]["next_layer"] == 8

    # the checkpoint cadence may change on resume (the recipe's identity leaves it out)
    recipe = _recipe(tmp_path, "chain-every-layer", artifact="chain", checkpoint_every=1)
    killed = _run(recipe, out, "--resume", stop_at="group0.layer18:KILL")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert json.loads((out / "checkpoint" / "checkpoint.json").read_text())["pass"]["next_layer"] == 19

    killed = _run(recipe, out, "--resume", stop_at="group0:KILL")
    assert killed.returncode == -9, killed.stderr[-3000:]
    manifest = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert manifest["completed_groups"] == 1 and manifest["pass"] is None

    finished = _run(recipe, out, "--resume")
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete"
    assert report["resumed_from"].startswith("after stages[0] (a3) + stages[1] (gptq)")
    assert not (out / "checkpoint").exists()  # removed after success

    expected, actual = _tensors(tmp_path / "reference-artifact"), _tensors(tmp_path / "chain-artifact")
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not (expected[name].dtype == actual[name].dtype
                                                    and expected[name].equal(actual[name]))]
    assert not different, different[:5]
    assert any(name.endswith("qweight") for name in expected)  # GPTQ ran
