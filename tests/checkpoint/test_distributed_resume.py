"""Checkpoints of data-parallel runs: rank 0 writes them, every rank resumes from them, with any number of processes.

A tiny random Llama (4 layers, SmolLM2's tokenizer so that the recipe cuts real calibration windows) runs A³ + GPTQ
+ export through ``a3q run``, as one process and as two gloo processes:

1. uninterrupted, one process (the reference), alongside the chain;
2. one process, SIGTERM after layer 0;
3. ``--resume`` with TWO processes (from the one-process checkpoint), SIGTERM to rank 1 only after layer 2: both
   ranks agree to stop there, rank 0 gathers the inputs and writes the checkpoint and the report, the launcher exits
   143 and prints how to resume with ``--nproc 2``;
4. ``--resume`` with ONE process (from the two-process checkpoint): finishes.

The artifact must equal the reference tensor for tensor. Three windows in batches of two: rank 0 holds a batch of two
windows, rank 1 a batch of one, so the saved inputs are gathered from batches of different sizes, and with one batch
per rank the reduced sums equal one process's bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tests.stop_at as stop_at_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, smollm2_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _recipe(folder: Path, model: Path, name: str) -> Path:
    recipe = {
        "model": str(model), "device": "cpu",
        "calibration": {"corpus": "enwiki", "split": "calib", "windows": 3, "seq_len": 32, "seed": 0},
        "stages": [{"stage": "a3", "allocation": "uniform", "ratio": 0.3, "batch_size": 2},
                   {"stage": "gptq", "bits": 4, "group_size": 16, "batch_size": 2},
                   {"stage": "export", "path": str(folder / f"{name}-artifact")}],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _start(recipe: Path, out: Path, nproc: int, *flags: str, stop_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "A3Q_COLLECTIVE_TIMEOUT_S": "120"}
    env.pop(stop_at_module.VARIABLE, None)
    if stop_at:
        env[stop_at_module.VARIABLE] = stop_at
    command = stop_at_module.command("run", str(recipe), "--out", str(out), "--nproc", str(nproc), *flags)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, code: int) -> str:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == code, stderr[-4000:]
    return " ".join(stderr.split())


def _tensors(artifact: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(artifact.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def test_a_distributed_run_checkpoints_and_resumes_with_any_number_of_processes(tmp_path, model_folder):
    reference = _start(_recipe(tmp_path, model_folder, "reference"), tmp_path / "reference", 1)
    recipe, out = _recipe(tmp_path, model_folder, "chain"), tmp_path / "chain"
    stderr = _finish(_start(recipe, out, 1, stop_at="group0.layer0:TERM"), 143)  # alongside the reference
    assert "stopped by SIGTERM after layer 0" in stderr
    assert json.loads((out / "checkpoint" / "checkpoint.json").read_text())["pass"]["next_layer"] == 1

    stderr = _finish(_start(recipe, out, 2, "--resume", stop_at="group0.layer2:TERM@1"), 143)
    assert "stopped by SIGTERM after layer 2" in stderr
    assert f"resume with: a3q run {recipe} --out {out} --nproc 2 --resume" in stderr
    assert "error:" not in stderr  # torchrun logs the exit code 143; a3q reports a stop, not a failure
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "stopped" and report["world_size"] == 2
    assert report.get("distributed", {}).get("layer_repairs", 0) == 0
    assert json.loads((out / "checkpoint" / "checkpoint.json").read_text())["pass"]["next_layer"] == 3

    _finish(_start(recipe, out, 1, "--resume"), 0)
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["resumed_from"] == "after layer 2 of stages[0] (a3) + stages[1] (gptq)"
    assert not (out / "checkpoint").exists()
    _finish(reference, 0)
    expected, actual = _tensors(tmp_path / "reference-artifact"), _tensors(tmp_path / "chain-artifact")
    assert expected.keys() == actual.keys()
    assert [name for name in expected if not torch.equal(expected[name], actual[name])] == []
