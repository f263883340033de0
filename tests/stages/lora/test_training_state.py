"""Mid-training checkpoints of the ``lora`` stage: a run stopped during training and started again resumes from its
last save and ends with exactly the adapter, losses and tokens of an uninterrupted run (CPU, bit for bit), with
both losses (``lm``, ``kd``) and dropout; a state saved for another base model is never applied."""

from __future__ import annotations

import copy

import pytest
import torch

from a3q.checkpoint.stops import RunStopped
from a3q.pipeline.context import StageContext
from a3q.stages.lora.config import LoraConfig
from a3q.stages.lora.stage import lora
from a3q.stages.lora.training_state import base_fingerprint
from tests.stages.lora.test_kd_stage import other_teacher, save_teacher  # noqa: F401
from tests.stages.lora.test_lora import FAST, lora_weights, one_thread, tiny, tokenizer  # noqa: F401

SETTINGS = {**FAST, "steps": 7, "dropout": 0.1, "checkpoint_steps": 2}


def context(folder, label: str = "stages[1] (lora)") -> StageContext:
    """A recipe's context (the stage saves its state only inside a recipe, in the run's folder)."""
    return StageContext(label=label, recipe_raw={"model": "tiny"}, output_dir=folder)


def stop_at_forward(model: torch.nn.Module, calls: int):
    """A forward hook that raises RunStopped (as a signal would) on the ``calls``-th training forward."""
    seen = {"n": 0}

    def hook(module, args, kwargs):  # noqa: ANN001, ANN202
        seen["n"] += 1
        if seen["n"] == calls:
            raise RunStopped("SIGTERM")

    return model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("fields", [{}, {"loss": "kd", "teacher_top_k": 8}], ids=["lm", "kd"])
def test_a_stopped_training_resumes_to_the_uninterrupted_adapter(tiny, other_teacher, tmp_path, fields):  # noqa: F811
    if fields:
        fields = {**fields, "teacher": str(other_teacher)}
    config = LoraConfig(**{**SETTINGS, **fields})
    whole_context = context(tmp_path / "whole")
    whole = lora(copy.deepcopy(tiny), config, whole_context)
    expected = lora_weights(whole)
    assert not list((tmp_path / "whole" / "lora-state").glob("*.safetensors"))  # removed once trained

    stopped = copy.deepcopy(tiny)
    handle = stop_at_forward(stopped.model, 6)  # during step 6: steps 1–4 saved (every 2), step 5 is lost
    with pytest.raises(RunStopped):
        lora(stopped, config, context(tmp_path / "run"))
    handle.remove()
    (saved,) = (tmp_path / "run" / "lora-state").glob("stages-1-lora-rank0of1-*.safetensors")

    resumed_context = context(tmp_path / "run")
    resumed = lora(copy.deepcopy(tiny), config, resumed_context)
    got = lora_weights(resumed)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    for key in ("steps", "tokens", "loss_first", "loss_curve", "train_loss"):
        assert resumed_context.metrics[key] == whole_context.metrics[key], key
    assert not saved.exists()


def test_a_state_saved_for_another_base_is_ignored(tiny, tmp_path):  # noqa: F811
    config = LoraConfig(**SETTINGS)
    stopped = copy.deepcopy(tiny)
    handle = stop_at_forward(stopped.model, 4)
    with pytest.raises(RunStopped):
        lora(stopped, config, context(tmp_path))
    handle.remove()
    assert len(list((tmp_path / "lora-state").glob("*.safetensors"))) == 1

    other = copy.deepcopy(tiny)
    with torch.no_grad():
        other.model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    assert base_fingerprint(other.model) != base_fingerprint(tiny.model)
    resumed_context = context(tmp_path)
    resumed = lora(copy.deepcopy(other), config, resumed_context)
    fresh_context = context(tmp_path / "fresh")
    fresh = lora(copy.deepcopy(other), config, fresh_context)
    assert resumed_context.metrics["loss_curve"] == fresh_context.metrics["loss_curve"]  # started at step 0
    got, expected = lora_weights(resumed), lora_weights(fresh)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
