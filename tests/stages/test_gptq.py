"""The gptq stage on the real model: shared pass with A³, v1 export, reload through a3q and remote code."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import a3q
from a3q.engine import run_recipe
from a3q.quant.gptq_linear import GPTQLinear
from a3q.recipe import RecipeError, parse_recipe
from tests.remote_code import remote_code_logits

CALIBRATION = {"corpus": "enwiki", "split": "calib", "windows": 2, "seq_len": 64, "seed": 0}
# to keep the suite fast only the attention of layers 0 and 3–9 is quantized ("layers.1" also matches 10–19);
# tests/calib/test_layerwise.py and tests/quant cover the MLP shapes. Mixed float/GPTQ layers must reload too.
GPTQ = {"stage": "gptq", "bits": 4, "group_size": 64, "skip_modules": ["mlp.", "layers.1", "layers.2"]}


def _run(tmp_path, stages, name):
    recipe = parse_recipe({"model": "smollm2-135m", "calibration": CALIBRATION,
                           "stages": [*stages, {"stage": "export", "path": str(tmp_path / name)}]})
    return run_recipe(recipe, tmp_path / f"run-{name}", show_table=False)


@pytest.fixture(scope="module")
def a3_gptq(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("a3-gptq")
    return tmp_path / "art", _run(tmp_path, [{"stage": "a3", "ratio": 0.2}, GPTQ], "art")


def test_a3_then_gptq_share_one_pass_and_report_each_stage(a3_gptq):
    _, result = a3_gptq
    rows = {row["stage"]: row for row in result.report.rows}
    assert rows["a3"]["shared_pass_with"] == ["stages[1] (gptq)"]
    assert rows["gptq"]["quantized_linears"] == 8 * 4
    assert rows["a3"]["weight_bytes"] > rows["gptq"]["weight_bytes"]  # bf16 after A³, 4-bit after GPTQ
    assert rows["gptq"]["params"] == rows["a3"]["params"]
    # o_proj has 9·vo_head_dim inputs after A³: a partial last group, listed for external kernels
    assert any("o_proj" in entry for entry in rows["gptq"]["partial_groups"])


def test_a3_gptq_export_reloads_identically_in_a3q_and_remote_code(a3_gptq):
    path, result = a3_gptq
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = result.graph.model(ids).logits
    reloaded = a3q.load(str(path))
    assert isinstance(reloaded.model.model.layers[3].self_attn.o_proj, GPTQLinear)
    assert reloaded.layers[3].quantized["o"] == {"method": "gptq", "bits": 4, "group_size": 64}
    assert reloaded.decoder_linear_bytes() == result.graph.decoder_linear_bytes()
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids).logits, expected)
    assert torch.allclose(remote_code_logits(path, ids, expected_class="A3LlamaForCausalLM"), expected, atol=1e-5)


def test_dense_gptq_export_is_a_standard_v1_checkpoint(tmp_path):
    result = _run(tmp_path, [GPTQ], "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["quantization_config"] == {
        "quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": True,
        "damp_percent": 0.01, "checkpoint_format": "gptq", "true_sequential": False,
    }
    with safe_open(str(tmp_path / "dense" / "model.safetensors"), "pt") as handle:
        prefix = "model.layers.0.self_attn.q_proj."
        assert handle.get_tensor(prefix + "qweight").shape == (576 // 8, 576)
        assert handle.get_tensor(prefix + "qzeros").shape == (576 // 64, 576 // 8)
        assert handle.get_tensor(prefix + "scales").dtype == torch.float16
        assert handle.get_tensor(prefix + "g_idx").dtype == torch.int32
        assert prefix + "weight" not in handle.keys()
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(1))
    reloaded = a3q.load(str(tmp_path / "dense"))
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids).logits, result.graph.model(ids).logits)


@pytest.mark.parametrize("stage,message", [
    ({"stage": "gptq", "group_size": 0}, "stages[0] (gptq): group_size: Value error, must be -1"),
    ({"stage": "gptq", "group_size": -2}, "stages[0] (gptq): group_size"),
    ({"stage": "gptq", "bits": 5}, "stages[0] (gptq): bits"),
])
def test_bad_settings_are_refused_before_loading(stage, message):
    with pytest.raises(RecipeError) as error:
        parse_recipe({"model": "smollm2-135m", "stages": [stage]})
    assert message.replace("Value error, ", "") in str(error.value)


def test_quantizing_twice_and_a3_after_gptq_are_refused():
    with pytest.raises(RecipeError) as error:
        parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "gptq"}, {"stage": "gptq"}, {"stage": "a3", "ratio": 0.1}]})
    text = str(error.value)
    assert "stages[1] (gptq): weights are already quantized by stages[0] (gptq)" in text
    assert "stages[2] (a3): needs float weights but stages[0] (gptq) quantized them" in text
