"""The gptq stage on the real model: shared pass with A³, v1 export, reload through a3q and remote code."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

import a3q
from a3q.engine import run_recipe
from a3q.quant.gptq_linear import GPTQLinear
from a3q.recipe import RecipeError, parse_recipe
from tests.remote_code import remote_code_logits


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # GPTQ's column loop is many small ops (two threads on 2 busy cores are slower)


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
    return tmp_path / "art", _run(tmp_path, [{"stage": "a3", "allocation": "uniform", "ratio": 0.2}, GPTQ], "art")


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
    # a recipe that names only bits and group_size gets the best measured settings (issue 32: static act-order,
    # whose contiguous groups keep the plain v1 layout), and the row says so
    row = next(row for row in result.report.rows if row["stage"] == "gptq")
    assert row["settings"] == {"sym": True, "act_order": "static", "act_group_aware": False, "damp_percent": 0.01,
                               "true_sequential": False}
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
    ({"stage": "gptq", "act_order": True, "act_group_aware": True},
     "stages[0] (gptq): act_group_aware: Value error, act_order and act_group_aware are exclusive"),
    ({"stage": "gptq", "damp_auto": "sometimes"}, "stages[0] (gptq): damp_auto"),
    ({"stage": "gptq", "true_sequential": 3}, "stages[0] (gptq): true_sequential"),
    ({"stage": "gptq", "act_group_awre": True}, "stages[0] (gptq): act_group_awre: Extra inputs are not permitted"),
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


# --- act-group-aware reordering, true-sequential order, automatic damping (issue 17) ---------------------------

# layer 0 only, every linear (true-sequential needs o and the MLP); 4×128 calibration tokens
ORDERED_CALIBRATION = {"corpus": "enwiki", "split": "calib", "windows": 4, "seq_len": 128, "seed": 0}
ONLY_LAYER_0 = [f"layers.{digit}" for digit in range(1, 10)]  # "layers.1" also matches 10–19, and so on
AGA = {"stage": "gptq", "bits": 4, "group_size": 64, "act_group_aware": True, "skip_modules": ONLY_LAYER_0}


@pytest.fixture(scope="module")
def aga_runs(tmp_path_factory):
    """The same GPTQ with act-group-aware reordering, without and with true-sequential (+ damp_auto)."""
    tmp_path = tmp_path_factory.mktemp("gptq-aga")

    def run(stage, name, export):
        stages = [stage] + ([{"stage": "export", "path": str(tmp_path / name)}] if export else [])
        recipe = parse_recipe({"model": "smollm2-135m", "calibration": ORDERED_CALIBRATION, "stages": stages})
        return run_recipe(recipe, tmp_path / f"run-{name}", show_table=False)

    return (tmp_path, run(AGA, "aga", export=False),
            run({**AGA, "true_sequential": True, "damp_auto": True}, "aga-ts", export=True))


def _gptq_row(result):
    return next(row for row in result.report.rows if row["stage"] == "gptq")


def test_true_sequential_remeasures_every_group_after_the_first(aga_runs):
    _, aga, sequential = aga_runs
    plain_errors, sequential_errors = _gptq_row(aga)["relative_error"][0], _gptq_row(sequential)["relative_error"][0]
    assert list(sequential_errors) == ["q+k+v", "o", "gate+up", "down"]  # forward order
    # layer 0's q/k/v read the embeddings either way: same Hessian, same codes
    assert sequential_errors["q+k+v"] == plain_errors["q+k+v"]
    attention = (aga.graph.model.model.layers[0].self_attn, sequential.graph.model.model.layers[0].self_attn)
    assert torch.equal(attention[0].q_proj.qweight, attention[1].q_proj.qweight)
    # o, gate/up and down see the inputs that the already quantized groups before them produce
    for key in ("o", "gate+up", "down"):
        assert sequential_errors[key] != plain_errors[key], key
    assert not torch.equal(attention[0].o_proj.qweight, attention[1].o_proj.qweight)
    row = _gptq_row(sequential)
    assert row["damp_percent_used"][0] == {key: 0.01 for key in sequential_errors}  # the default; SmolLM2 needs no more
    assert "act-group-aware, true-sequential" in row["note"]
    assert row["worst_relative_error"] == max(e for layer in row["relative_error"] for e in layer.values())


def test_act_group_aware_export_is_plain_v1_and_reloads_identically(aga_runs):
    tmp_path, _, sequential = aga_runs
    folder = tmp_path / "aga-ts"
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["desc_act"] is False  # groups stay contiguous: no act-order layout
    assert config["quantization_config"]["true_sequential"] is True
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            g_idx = handle.get_tensor(f"model.layers.0.{name}.g_idx")
            assert torch.equal(g_idx, torch.arange(g_idx.shape[0], dtype=torch.int32) // 64), name
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(2))
    reloaded = a3q.load(str(folder))
    assert isinstance(reloaded.model.model.layers[0].mlp.down_proj, GPTQLinear)
    assert not isinstance(reloaded.model.model.layers[1].mlp.down_proj, GPTQLinear)
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids).logits, sequential.graph.model(ids).logits)


def test_act_group_aware_lowers_the_error_on_smollm2_hessians():
    """Layer 0's real Hessians (q/k/v input, down_proj input) from enwiki/calib: GAR beats plain GPTQ on both."""
    from a3q.calib.sources import enwiki
    from a3q.calib.windows import random_windows
    from a3q.io.loading import load_graph
    from a3q.quant.gptq import HessianAccumulator, gptq_quantize

    graph = load_graph("smollm2-135m")
    windows = random_windows(graph.tokenizer, enwiki("calib"), 128, 4, 0)
    layer = graph.model.model.layers[0]
    accumulators = {name: HessianAccumulator(getattr(layer, path).get_submodule(name).in_features)
                    for path, name in (("self_attn", "q_proj"), ("mlp", "down_proj"))}
    handles = [layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: accumulators["q_proj"].add(a[0])),
               layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: accumulators["down_proj"].add(a[0]))]
    try:
        with torch.no_grad():
            graph.model.model.layers = graph.model.model.layers[:1]  # only layer 0 is needed
            graph.model.model(input_ids=windows, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    weights = {"q_proj": torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight]),
               "down_proj": layer.mlp.down_proj.weight}
    for name, weight in weights.items():
        hessian = accumulators[name].hessian()
        plain = gptq_quantize(weight, hessian, bits=4, group_size=64)
        aga = gptq_quantize(weight, hessian, bits=4, group_size=64, act_group_aware=True)
        assert aga.relative_error < 0.9 * plain.relative_error, (name, aga.relative_error, plain.relative_error)


def test_worst_error_does_not_hide_nan():
    from a3q.stages.gptq import worst_error

    assert worst_error([{"a": 0.1}, {"b": 0.3, "c": 0.2}]) == 0.3
    assert worst_error([]) == 0.0
    for errors in ([{"a": float("nan")}, {"b": 0.3}], [{"b": 0.3}, {"a": float("nan")}]):
        assert math.isnan(worst_error(errors))  # max() returns 0.3 for one of these two orders
