"""A short distillation run of the real SmolLM2 through the engine, stopped during training and resumed.

The student is SmolLM2 in bitsandbytes nf4 (QLoRA: the cheapest stage that makes it differ from its teacher), the
teacher is ``input`` (the recipe's model, loaded again for the teacher pass). Two windows × 128 tokens, two steps.
The first run is stopped by a real SIGTERM as training starts, after the teacher's targets were cached in the output
folder; ``--resume`` restarts the lora stage from the checkpoint after ``bnb`` and reads the cache back instead of
running the teacher again.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from a3q.checkpoint.stops import RunStopped
from a3q.engine import run_recipe
from a3q.recipe import parse_recipe
from a3q.stages.lora import stage as lora_stage

RECIPE = {
    "model": "smollm2-135m",
    "stages": [
        {"stage": "bnb", "quant_type": "nf4"},
        {"stage": "lora", "loss": "kd", "teacher_top_k": 16, "r": 4, "steps": 2, "batch_size": 1, "seq_len": 128},
    ],
}


def test_kd_run_caches_the_teacher_and_a_resume_reuses_it(tmp_path, monkeypatch, one_torch_thread):
    recipe = parse_recipe(RECIPE)
    out = tmp_path / "run"
    real_train = lora_stage.train

    def stopped_train(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the run's handler raises RunStopped here
        return real_train(*args, **kwargs)

    monkeypatch.setattr(lora_stage, "train", stopped_train)
    with pytest.raises(RunStopped):
        run_recipe(recipe, out, show_table=False)
    assert json.loads((out / "report.json").read_text())["status"] == "stopped"
    (cached,) = (out / "lora-teacher").glob("*.safetensors")
    assert cached.name.startswith("stages-1-lora-rank0of1-")
    assert cached.stat().st_size > 2 * 127 * 16 * 8  # 2 windows × 127 predictions × 16 × (index + log prob)
    stamp = cached.stat().st_mtime_ns

    monkeypatch.setattr(lora_stage, "train", real_train)
    result = run_recipe(recipe, out, show_table=False, resume=True)
    row = next(r for r in result.report.rows if r["stage"] == "lora")
    assert row["steps"] == 2 and row["tokens"] == 2 * 128 and row["loss"] == "kd"
    assert row["teacher_cache_reused"] and row["teacher_seconds"] == 0.0 and row["teacher_cache"] == str(cached)
    assert cached.stat().st_mtime_ns == stamp
    assert 0.0 < row["loss_first"] < 5.0 and 0.0 < row["teacher_tail_mass"] < 1.0  # nf4 vs float: a small KL
    assert result.graph.adapter is not None
