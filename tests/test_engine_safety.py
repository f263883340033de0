"""What a run does with bad input it can only see at run time: non-finite weights, an export onto its own report
folder, too little text, and what the report says when it fails (issue 16's reproducers, on the real SmolLM2)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from a3q.pipeline.runner import run_pipeline
from a3q.pipeline.stage import CalibratingStage
from a3q.engine import StageError, run_recipe
from a3q.numerics import NonFiniteError
from a3q.recipe import RecipeError, parse_recipe

TINY_CALIBRATION = {"corpus": "enwiki", "split": "calib", "windows": 2, "seq_len": 64, "seed": 0}


def _model_copy(source: Path, target: Path, edit=None) -> Path:
    """A copy of a model folder (hard links), with the weights rewritten by ``edit(state)`` when given."""
    target.mkdir(parents=True)
    for file in source.iterdir():
        if file.name != "model.safetensors" or edit is None:
            os.link(file, target / file.name)
    if edit is not None:
        state = load_file(str(source / "model.safetensors"))
        edit(state)
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_nan_weight_stops_the_run_naming_layer_and_tensor_and_exports_nothing(smollm2_path, tmp_path):
    def poison(state):
        state["model.layers.29.mlp.down_proj.weight"][3, 7] = float("nan")

    folder = _model_copy(smollm2_path, tmp_path / "nan-model", poison)
    recipe = parse_recipe({
        "model": str(folder), "calibration": TINY_CALIBRATION,
        "stages": [{"stage": "gptq", "bits": 4, "group_size": 64}, {"stage": "export", "path": str(tmp_path / "art")}],
    })
    with pytest.raises(StageError, match=r"model\.layers\.29\.mlp\.down_proj\.weight \(layer 29\): 1 NaN"):
        run_recipe(recipe, tmp_path / "run", show_table=False)
    assert not (tmp_path / "art").exists()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "failed" and "down_proj" in report["failed"]


class _Poisoner(CalibratingStage):
    """A stage whose processing of one layer produces a NaN (what a numerically broken stage would do)."""

    name = "poisoner"

    def process(self, graph, index):
        if index == 3:
            graph.model.model.layers[3].self_attn.o_proj.weight.data[0, 0] = float("inf")


def test_a_stage_that_produces_inf_is_stopped_at_that_layer(smollm2):
    graph = copy.deepcopy(smollm2)
    windows = torch.randint(0, 1000, (2, 16))
    with pytest.raises(NonFiniteError, match=r"poisoner, layer 3: .*layers\.3\.self_attn\.o_proj\.weight.* 1 inf"):
        run_pipeline(graph, windows, [_Poisoner()], progress=False)


def test_report_status_and_checks_before_loading(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # an export onto the run's own output folder would replace its report: refused before the model loads
    recipe = parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "export", "path": "run"}]})
    with pytest.raises(RecipeError, match=r"stages\[0\] \(export\): path: 'run' is \(or contains\) the run's output"):
        run_recipe(recipe, "run", show_table=False)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["status"] == "failed" and report["stages"] == []  # no load row: nothing was loaded

    # more evaluation windows than the split holds: the count is in the message
    recipe = parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "evaluate", "max_windows": 100_000, "seq_len": 512}]})
    with pytest.raises(RecipeError, match=r"stages\[0\] \(evaluate\): max_windows: enwiki/test has [\d,]+ tokens, i\.e\. 256 windows of 512"):
        run_recipe(recipe, "run2", show_table=False)
    recipe = parse_recipe({"model": "smollm2-135m", "calibration": {"windows": 5000, "seq_len": 512},
                           "stages": [{"stage": "a3", "allocation": "uniform", "ratio": 0.2}]})
    with pytest.raises(RecipeError, match=r"calibration\.windows: enwiki/calib has [\d,]+ tokens, i\.e\. 1146 windows"):
        run_recipe(recipe, "run3", show_table=False)

    recipe = parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "evaluate", "max_windows": 1, "seq_len": 32}]})
    run_recipe(recipe, "ok", show_table=False)
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert report["status"] == "complete" and [row["stage"] for row in report["stages"]] == ["load", "evaluate"]


@pytest.mark.parametrize("later", [
    {"stage": "gptq", "bits": 4, "group_size": 64},
    {"stage": "bnb", "quant_type": "nf4"},
    {"stage": "lora", "steps": 1},
    {"stage": "kv", "kv_ratio": 0.2},
    {"stage": "a3", "ratio": 0.1},
    {"stage": "svd_llm", "ratio": 0.1},
])
def test_stages_that_cannot_take_factored_linears_are_refused_after_a_baseline(later):
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "svd", "ratio": 0.2}, later]})
    (problem,) = caught.value.problems
    assert problem.startswith(f"stages[1] ({later['stage']}):") and "stages[0] (svd)" in problem


def test_a_quantized_cache_after_a_baseline_is_allowed():
    parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "svd", "ratio": 0.2}, {"stage": "kv", "bits": 8}]})


def test_kv_export_code_is_generated_from_checked_names_only(smollm2_path, tmp_path):
    """A crafted ``auto_map`` in the input's config.json must not reach the generated modeling file."""
    from tests.remote_code import remote_code_logits

    folder = _model_copy(smollm2_path, tmp_path / "crafted")
    config = json.loads((folder / "config.json").read_text())
    injected = "x.Y as _B\nimport os; os.system('touch PWNED')  #"
    config["auto_map"] = {"AutoModelForCausalLM": injected}
    (folder / "config.json").unlink()  # a hard link to the real model's file: replace, do not write through
    (folder / "config.json").write_text(json.dumps(config))
    recipe = parse_recipe({"model": str(folder), "stages": [{"stage": "kv", "bits": 8},
                                                          {"stage": "export", "path": str(tmp_path / "art")}]})
    result = run_recipe(recipe, tmp_path / "run", show_table=False)
    code = (tmp_path / "art" / "modeling_a3q_kv.py").read_text()
    assert "os.system" not in code and "PWNED" not in code
    assert "from transformers import LlamaForCausalLM as _Base" in code
    exported = json.loads((tmp_path / "art" / "config.json").read_text())
    assert exported["auto_map"] == {"AutoModelForCausalLM": "modeling_a3q_kv.LlamaForCausalLMWithQuantizedKV"}
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345]])
    with torch.no_grad():
        expected = result.graph.model(input_ids=ids).logits
    assert torch.allclose(remote_code_logits(tmp_path / "art", ids, remote_class=True), expected, atol=1e-5)
    assert not (tmp_path / "PWNED").exists()
