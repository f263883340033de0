"""``device`` and ``dtype`` of a recipe, resolved (:mod:`a3q.placement`), and how validation treats them."""

from __future__ import annotations

import pytest
import torch

from a3q.placement import checkpoint_dtype, device_problem, resolve_device, resolve_dtype
from a3q.recipe import RecipeError, parse_recipe


def test_auto_device_is_the_first_gpu_or_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda:0")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert "has 2 GPU(s)" in device_problem("cuda:2")


def test_cuda_without_a_gpu_is_refused_at_validation(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"model": "smollm2-135m", "device": "cuda:0", "stages": [{"stage": "evaluate"}]})
    assert caught.value.problems == [
        "device: 'cuda:0' asks for a GPU, but CUDA is not available on this machine (use device: cpu or auto)"]
    with pytest.raises(RecipeError, match="device: 'tpu' is not a device name"):
        parse_recipe({"model": "smollm2-135m", "device": "tpu", "stages": [{"stage": "evaluate"}]})


def test_auto_dtype_is_float32_on_cpu_and_the_checkpoints_on_gpu():
    config = {"torch_dtype": "bfloat16"}
    assert resolve_dtype("auto", config, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", config, torch.device("cuda:0")) == torch.bfloat16
    assert resolve_dtype("auto", {"dtype": "float16"}, torch.device("cuda:0")) == torch.float16
    assert resolve_dtype("auto", {}, torch.device("cuda:0")) == torch.float32  # nothing declared
    assert resolve_dtype("bfloat16", config, torch.device("cpu")) == torch.bfloat16  # explicit wins
    assert checkpoint_dtype({"text_config": {"torch_dtype": "bfloat16"}}) == torch.bfloat16
    with pytest.raises(ValueError, match="not a dtype"):
        resolve_dtype("int4", config, torch.device("cpu"))


def test_recipe_defaults_are_auto_and_cpu_runs_keep_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "evaluate"}]})
    assert (recipe.device, recipe.dtype, recipe.revision) == ("auto", "auto", None)
    assert resolve_dtype(recipe.dtype, {"torch_dtype": "bfloat16"}, resolve_device(recipe.device)) == torch.float32
