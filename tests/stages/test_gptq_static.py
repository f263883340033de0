"""The gptq stage with ``act_order: static`` (issue 32): settings, and an export that is a plain v1 checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import a3q
from a3q.engine import run_recipe
from a3q.recipe import RecipeError, parse_recipe
from a3q.stages.gptq import GPTQConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CALIBRATION = {"corpus": "enwiki", "split": "calib", "windows": 2, "seq_len": 64, "seed": 0}
ONLY_LAYER_0 = [f"layers.{digit}" for digit in range(1, 10)]  # "layers.1" also matches 10–19, and so on


def test_static_is_the_default_group_aware_alone_turns_it_off_and_misspellings_are_refused():
    assert GPTQConfig().act_order == "static" and GPTQConfig().act_group_aware is False
    assert GPTQConfig(act_order=True).act_group_aware is False
    assert GPTQConfig(act_group_aware=True).act_order is False
    with pytest.raises(RecipeError, match="act_order"):
        parse_recipe({"model": "smollm2-135m", "calibration": CALIBRATION,
                      "stages": [{"stage": "gptq", "act_order": "dynamic"}]})
    with pytest.raises(RecipeError, match="exclusive"):
        parse_recipe({"model": "smollm2-135m", "calibration": CALIBRATION,
                      "stages": [{"stage": "gptq", "act_order": "static", "act_group_aware": True}]})


def test_static_export_is_plain_v1_and_reloads_identically(tmp_path):
    stages = [{"stage": "gptq", "bits": 4, "group_size": 64, "act_order": "static", "skip_modules": ONLY_LAYER_0},
              {"stage": "export", "path": str(tmp_path / "static")}]
    result = run_recipe(parse_recipe({"model": "smollm2-135m", "calibration": CALIBRATION, "stages": stages}),
                        tmp_path / "run", show_table=False)
    config = json.loads((tmp_path / "static" / "config.json").read_text())
    assert config["quantization_config"]["desc_act"] is False  # GPTQModel / vLLM read it as an ordinary checkpoint
    assert config["a3q_gptq"]["act_order"] == "static" and config["a3q_gptq"]["act_group_aware"] is False
    row = next(row for row in result.report.rows if row["stage"] == "gptq")
    assert "static act-order" in row["note"]
    with safe_open(str(tmp_path / "static" / "model.safetensors"), "pt") as handle:
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            g_idx = handle.get_tensor(f"model.layers.0.{name}.g_idx")
            assert torch.equal(g_idx, torch.arange(g_idx.shape[0], dtype=torch.int32) // 64), name
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(3))
    reloaded = a3q.load(str(tmp_path / "static"))
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids).logits, result.graph.model(ids).logits)
