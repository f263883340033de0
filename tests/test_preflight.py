"""The memory preflight (:mod:`a3q.preflight`): an estimate from headers and the recipe, and a clear refusal."""

from __future__ import annotations

import pytest
import torch

import a3q.preflight as preflight_module
from a3q.preflight import check_memory, checkpoint_tensors, estimate_memory, preflight
from a3q.recipe import RecipeError, parse_recipe

GIB = 1 << 30


def _recipe(**fields):
    raw = {"model": "smollm2-135m", "device": "cpu", "stages": [{"stage": "a3", "ratio": 0.2}, {"stage": "evaluate"}]}
    return parse_recipe({**raw, **fields})


def test_the_estimate_reads_headers_only_and_counts_smollm2(smollm2_path):
    counts = checkpoint_tensors(smollm2_path)
    assert counts == {"F32": 134_515_008}  # every parameter (the LM head is tied: not stored)
    estimate = estimate_memory(_recipe())
    host = estimate["host"]
    assert estimate["device"] == "cpu" and estimate["dtype"] == "float32" and "device_memory" not in estimate
    assert host["weights"] == 4 * 134_515_008 and host["weights_file_pages"] == 0
    assert host["calibration_activations"] == 2 * 32 * 512 * 576 * 4
    assert host["layer_statistics"] == 8 * 3 * 1536**2  # down_proj's Hessian and GPTQ's two inversion matrices
    # loading alone (no calibration, no evaluation) is runtime + weights: measured peak RSS of a float32 load plus
    # the finite check that touches every weight was 947 MiB; the estimate must be within 30% of it
    load_only = host["runtime"] + host["weights"]
    assert abs(load_only / (947 << 20) - 1) < 0.3


def test_bfloat16_halves_the_weights_and_adds_the_file_pages_while_converting():
    host = estimate_memory(_recipe(dtype="bfloat16"))["host"]
    assert host["weights"] == 2 * 134_515_008 and host["weights_file_pages"] == 4 * 134_515_008


def test_a_run_that_does_not_fit_is_refused_naming_the_fields(monkeypatch):
    monkeypatch.setattr(preflight_module, "available_host_memory", lambda: 1 * GIB)
    with pytest.raises(RecipeError) as caught:
        check_memory(_recipe())
    message = str(caught.value)
    assert message.startswith("invalid recipe:\n  memory: the run needs about")
    assert "1.00 GiB is available" in message and "dtype float32" in message
    for advice in ("dtype: bfloat16", "calibration.windows", "batch_size", "offload: disk"):
        assert advice in message
    plan = preflight(_recipe())  # refused, with the estimate that says why (the report keeps it)
    assert plan.problems and plan.problems[0].startswith("memory: the run needs about")
    assert plan.report_fields()["memory_estimate"]["host_total"] > GIB


def test_a_run_that_fits_gets_its_plan(monkeypatch):
    monkeypatch.setattr(preflight_module, "available_host_memory", lambda: 64 * GIB)
    plan = preflight(_recipe(offload="auto"), processes=1)
    assert plan.problems == [] and (plan.device, plan.dtype, plan.offload, plan.processes) == ("cpu", "float32", "none", 1)
    assert plan.estimate["available_host"] == 64 * GIB
    assert plan.report_fields() == {"device": "cpu", "dtype": "float32", "offload": "none", "memory_estimate": plan.estimate}


def test_stages_declare_their_memory_and_the_largest_of_each_component_counts():
    """No rule in the preflight names a stage: each config declares its components (a3q.registry.StageConfig)."""
    from a3q.pipeline.plan import ModelShape

    shape = ModelShape(hidden=64, intermediate=256, heads=4, layers=2, vocab=1000, width=4)
    recipe = _recipe(stages=[{"stage": "evaluate", "batch_size": 8, "seq_len": 128},
                             {"stage": "lora", "steps": 1, "batch_size": 2, "seq_len": 64}])
    evaluate, lora = (spec.config.memory_estimate(shape, 512) for spec in recipe.stages)
    assert evaluate == {"forward_workspace": shape.forward_bytes(8, 128, logits=True)}
    assert set(lora) == {"forward_workspace", "lora_training"} and lora["lora_training"] > 0
    parts = estimate_memory(recipe)["host"]
    assert parts["forward_workspace"] > 0 and parts["lora_training"] > 0
    assert "gradient_checkpointing: true on lora" in recipe.stages[1].config.memory_advice()


def test_gpu_runs_estimate_device_memory_separately(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(preflight_module, "available_device_memory", lambda device: 1 << 20)
    monkeypatch.setattr(preflight_module, "available_host_memory", lambda: 64 * GIB)
    recipe = _recipe(device="cuda", stages=[{"stage": "lora", "steps": 1}])
    estimate = estimate_memory(recipe)
    assert estimate["device"] == "cuda:0" and estimate["device_memory"]["lora_training"] > 0
    assert estimate["host"]["runtime"] + estimate["host"]["weights_file_pages"] == estimate["host_total"]
    with pytest.raises(RecipeError, match="memory on cuda:0"):
        check_memory(recipe, estimate=estimate)


def test_available_memory_is_known_on_linux():
    assert preflight_module.available_host_memory() > 0
