"""The ``bnb`` stage: bitsandbytes NF4/FP4/int8 on SmolLM2 and on A³ shapes, exact byte counts, save and reload.

bitsandbytes runs on CPU here. a3q's 4-bit linears dequantize and multiply in compute_dtype, exactly for any shape
(a3q.modeling.a3q_bnb_cpu), so a3q's own reload is bit-exact; a plain transformers process on a dense model uses
bitsandbytes' defaults, on AVX512-BF16 CPUs a bf16 kernel: compared with a tolerance.
"""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import a3q
from a3q.arch import LAYER_PREFIX, LINEAR_PATHS, describe, layer_linears
from a3q.calib.sources import enwiki
from a3q.calib.windows import sequential_windows
from a3q.io.artifact import save_artifact
from a3q.quant import bnb as bnb_format
from a3q.module_types import storage_of, weight_bytes
from a3q.recipe import RecipeError, parse_recipe
from a3q.engine import apply_stage
from a3q.registry import get_stage
from a3q.stages.bnb import BnbConfig
from tests.remote_code import remote_code_logits
from tests.stages.a3.test_pipeline_tiny import ALL, graph_of, tiny_gpt2, tiny_llama, tokens

#: nf4 logits of a plain transformers process (bitsandbytes' bf16 CPU kernel) vs a3q's (fp32 reference path):
#: measured ≤ 1.8% of the largest |logit| on SmolLM2 text; allowed: 3%
FRESH_PROCESS_RTOL = 3e-2


def run_bnb(graph, **fields):
    return apply_stage(graph, "bnb", BnbConfig(**fields))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def bnb_linear_types():
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def saved_weight_bytes(directory: Path, graph) -> dict[str, tuple[int, int]]:
    """Module path → (bytes in model.safetensors under ``path.`` except the bias, stored_bytes of its record)."""
    expected = {}
    for index, layer in enumerate(graph.layers):
        shapes = layer.linear_shapes(graph.hidden_size)
        for short, storage in layer.quantized.items():
            path = LAYER_PREFIX[graph.family].format(index=index) + LINEAR_PATHS[graph.family][short]
            expected[path] = bnb_format.stored_bytes(storage, *shapes[short])
    found = dict.fromkeys(expected, 0)
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        for key in handle.keys():
            owner = next((path for path in expected if key.startswith(path + ".")), None)
            if owner is not None and key != owner + ".bias":
                found[owner] += handle.get_tensor(key).nbytes
    return {path: (found[path], expected[path]) for path in expected}


# ---------------------------------------------------------------- config and recipe rules


RECIPE = {"model": "smollm2-135m", "stages": []}


def _problems(*stages) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        parse_recipe({**RECIPE, "stages": list(stages)}, check_model=False)
    return caught.value.problems


@pytest.mark.parametrize("field, value", [("double_quant", False), ("compute_dtype", "bfloat16"), ("blocksize", 128)])
def test_four_bit_fields_are_refused_with_int8(field, value):
    (problem,) = _problems({"stage": "bnb", "quant_type": "int8", field: value})
    assert problem.startswith(f"stages[0] (bnb): {field}: only applies to 4-bit"), problem


def test_int8_threshold_is_refused_with_four_bit_and_bad_values_are_named():
    (problem,) = _problems({"stage": "bnb", "quant_type": "nf4", "threshold": 4.0})
    assert problem.startswith("stages[0] (bnb): threshold: only applies to int8"), problem
    problems = _problems({"stage": "bnb", "quant_type": "int4", "blocksize": 100})
    assert any(p.startswith("stages[0] (bnb): quant_type:") for p in problems)
    assert any(p.startswith("stages[0] (bnb): blocksize:") for p in problems)
    # defaults are not "given": int8 with the 4-bit defaults is fine
    parse_recipe({**RECIPE, "stages": [{"stage": "bnb", "quant_type": "int8", "threshold": 0.0}]}, check_model=False)


def test_quantizing_twice_and_float_stages_after_bnb_are_refused():
    (problem,) = _problems({"stage": "bnb"}, {"stage": "bnb", "quant_type": "int8"})
    assert problem.startswith("stages[1] (bnb): weights are already quantized by stages[0] (bnb)"), problem
    (problem,) = _problems({"stage": "bnb"}, {"stage": "a3", "ratio": 0.2})
    assert problem.startswith("stages[1] (a3): needs float weights but stages[0] (bnb) quantized them"), problem
    (problem,) = _problems({"stage": "svd", "ratio": 0.2}, {"stage": "bnb"})
    assert problem.startswith("stages[1] (bnb): ") and "two-factor low-rank linears of stages[0] (svd)" in problem, problem


# ---------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def text_ids(smollm2):
    return sequential_windows(smollm2.tokenizer, enwiki("test"), 64, 2)


@pytest.fixture(scope="module")
def float_logits(smollm2, text_ids):
    return logits(smollm2.model, text_ids)


@pytest.fixture(scope="module")
def nf4(smollm2):
    return run_bnb(copy.deepcopy(smollm2))


@pytest.fixture(scope="module")
def nf4_logits(nf4, text_ids):
    return logits(nf4[0].model, text_ids)


@pytest.fixture(scope="module")
def nf4_artifact(nf4, tmp_path_factory):
    graph, _ = nf4
    return save_artifact(graph, tmp_path_factory.mktemp("bnb") / "smollm2-nf4", recipe=None, report=[])


def _agreement(a, b) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


def _kl(quantized, reference) -> float:
    """Mean KL(reference ‖ quantized) of the next-token distributions."""
    p, q = reference.log_softmax(-1), quantized.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_nf4_smollm2_replaces_every_decoder_linear_and_stays_close(smollm2, nf4, nf4_logits, float_logits):
    graph, metrics = nf4
    four_bit, _ = bnb_linear_types()
    for index, layer in enumerate(graph.layers):
        linears = layer_linears(graph.model, "llama", index)
        assert all(type(m) is four_bit for m in linears.values())
        assert layer.quantized == {short: bnb_format.describe(m) for short, m in linears.items()}
    assert layer.quantized["down"] | {"metadata_bytes": 0} == {
        "method": "bnb", "quant_type": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "float32",
        "metadata_bytes": 0,
    }
    assert type(graph.model.lm_head) is nn.Linear and type(smollm2.model.model.layers[0].mlp.up_proj) is nn.Linear
    assert metrics["quant_type"] == "nf4" and metrics["quantized_linears"] == 210
    assert 4.1 < metrics["bits_per_weight"] < 4.2  # 4 bits + one 8-bit scale per 64 + nested scales + metadata
    assert graph.decoder_linear_params() == smollm2.decoder_linear_params()
    assert graph.decoder_linear_bytes() < 0.27 * smollm2.decoder_linear_bytes()  # vs bf16
    quantized = nf4_logits
    # measured on these 2×64 tokens: KL 0.24, top-1 agreement 0.77 (fp4: 0.41, 0.74; int8: 0.019, 0.91)
    assert 0.02 < _kl(quantized, float_logits) < 0.5 and _agreement(quantized, float_logits) > 0.6


def test_int8_on_some_smollm2_layers_stays_close(smollm2, text_ids, float_logits):
    """int8 (LLM.int8(), threshold 6) on 8 of the 30 layers (fragments keep the rest float): a cheap real-weight check."""
    graph, metrics = run_bnb(copy.deepcopy(smollm2), quant_type="int8", skip_modules=["lm_head", "layers.1", "layers.2"])
    _, eight_bit = bnb_linear_types()
    quantized_layers = [i for i in range(30) if all(type(m) is eight_bit for m in layer_linears(graph.model, "llama", i).values())]
    assert quantized_layers == [0, 3, 4, 5, 6, 7, 8, 9]
    assert all(type(m) is nn.Linear for i in (1, 15, 29) for m in layer_linears(graph.model, "llama", i).values())
    assert graph.layers[7].quantized["q"] == {"method": "bnb", "quant_type": "int8", "threshold": 6.0}
    assert not graph.layers[15].quantized and len(metrics["float_linears"]) == 22 * 7
    assert 8.0 < metrics["bits_per_weight"] < 8.1  # int8 codes + one float32 scale per row
    skip = graph.model.config.quantization_config.llm_int8_skip_modules
    assert skip[:2] == ["lm_head", "model.layers.1.self_attn.q_proj"] and len(skip) == 1 + 22 * 7
    quantized = logits(graph.model, text_ids)
    assert _kl(quantized, float_logits) < 0.03 and _agreement(quantized, float_logits) > 0.85


def test_nf4_artifact_bytes_config_and_reload(nf4, nf4_artifact, nf4_logits, text_ids):
    graph, _ = nf4
    for path, (found, expected) in saved_weight_bytes(nf4_artifact, graph).items():
        assert found == expected, path
    config = json.loads((nf4_artifact / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"] and not config["load_in_8bit"]
    assert config["bnb_4bit_quant_type"] == "nf4" and config["bnb_4bit_use_double_quant"]
    assert config["bnb_4bit_compute_dtype"] == "float32" and config["llm_int8_skip_modules"] == ["lm_head"]

    reloaded = a3q.load(str(nf4_artifact))
    assert [layer.quantized for layer in reloaded.layers] == [layer.quantized for layer in graph.layers]
    assert reloaded.decoder_linear_bytes() == graph.decoder_linear_bytes()
    manifest = json.loads((nf4_artifact / "a3q.json").read_text())
    assert manifest["structure"]["layers"][0]["quantized"] == graph.layers[0].quantized
    assert torch.equal(logits(reloaded.model, text_ids), nf4_logits)  # a3q's reference CPU path: exact


def test_nf4_artifact_loads_without_a3q(nf4_artifact, nf4_logits, text_ids):
    expected = nf4_logits
    fresh = remote_code_logits(nf4_artifact, text_ids, "LlamaForCausalLM", device_map="cpu", remote_class=False)
    torch.testing.assert_close(fresh, expected, rtol=0, atol=FRESH_PROCESS_RTOL * float(expected.abs().max()))
    assert _agreement(fresh, expected) > 0.95


# ---------------------------------------------------------------- A³ shapes (tiny random models)


@pytest.fixture(scope="module")
def tiny_a3():
    """A tiny Llama compressed by A³ to odd sizes: q/k/v/gate/up outputs 40/20/26/61/61, o and down inputs 52 and 61."""
    from a3q.stages.a3.apply import compress_model
    from a3q.stages.a3.ranks import LayerRanks
    from a3q.stages.a3.statistics import collect_statistics

    graph = graph_of(tiny_llama(kv_heads=2, bias=True))
    statistics = collect_statistics(graph, tokens(), set(ALL), progress=False)
    plans = [LayerRanks(qk=10, vo=13, ff=61) for _ in graph.layers]
    compressed, _ = compress_model(graph, statistics, plans, 1e-6, ALL, progress=False)
    return compressed


def _with_dequantized_weights(float_graph, quantized_graph):
    """A float copy of the model whose linears hold exactly the weights the bitsandbytes modules stand for."""
    reference = copy.deepcopy(float_graph.model)
    for index in range(len(float_graph.layers)):
        targets = layer_linears(reference, float_graph.family, index)
        for short, module in layer_linears(quantized_graph.model, quantized_graph.family, index).items():
            with torch.no_grad():
                targets[short].weight.copy_(bnb_format.dequantize(module))
    return reference


@pytest.mark.parametrize(
    "fields, tolerance",
    [
        ({"quant_type": "nf4"}, 1e-5),  # fp32 compute: the dequantized weights exactly
        ({"quant_type": "fp4", "double_quant": False, "blocksize": 32, "compute_dtype": "bfloat16"}, 2e-2),
        ({"quant_type": "int8", "threshold": 0.0}, 3e-2),  # LLM.int8() also quantizes activations per token
    ],
    ids=["nf4", "fp4-single-b32-bf16", "int8"],
)
def test_a3_shapes_quantize_export_and_reload(tiny_a3, smollm2, tmp_path, fields, tolerance):
    graph = copy.deepcopy(tiny_a3)
    graph.tokenizer = smollm2.tokenizer  # only so the artifact has one
    graph, _ = run_bnb(graph, **fields)
    linears = layer_linears(graph.model, "llama", 1)
    assert (linears["down"].in_features, linears["o"].in_features, linears["q"].out_features) == (61, 52, 40)
    assert linears["q"].bias is not None and type(graph.model.lm_head) is nn.Linear
    probe = tokens(2, 20)
    quantized = logits(graph.model, probe)
    reference = logits(_with_dequantized_weights(tiny_a3, graph), probe)
    torch.testing.assert_close(quantized, reference, rtol=0, atol=tolerance * float(reference.abs().max()))

    path = save_artifact(graph, tmp_path / "art", recipe=None, report=[])
    assert (path / "modeling_a3q_llama.py").is_file()
    for module_path, (found, expected) in saved_weight_bytes(path, graph).items():
        assert found == expected, module_path
    reloaded = a3q.load(str(path))
    assert [layer.quantized for layer in reloaded.layers] == [layer.quantized for layer in graph.layers]
    assert torch.equal(logits(reloaded.model, probe), quantized)


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_a3_shapes_load_without_a3q(tiny_a3, smollm2, tmp_path, quant_type):
    graph = copy.deepcopy(tiny_a3)
    graph.tokenizer = smollm2.tokenizer
    graph, _ = run_bnb(graph, quant_type=quant_type)
    probe = tokens(2, 20)
    expected = logits(graph.model, probe)
    path = save_artifact(graph, tmp_path / "art", recipe=None, report=[])
    fresh = remote_code_logits(path, probe, "A3LlamaForCausalLM", device_map="cpu")
    torch.testing.assert_close(fresh, expected, rtol=0, atol=FRESH_PROCESS_RTOL * float(expected.abs().max()))


def test_dense_gpt2_is_converted_and_skip_modules_keep_linears_float(smollm2, tmp_path):
    graph = graph_of(tiny_gpt2())  # a3q_gpt2 at full rank: what the stage converts dense GPT-2 to
    dense = describe(tiny_gpt2(), tokenizer=smollm2.tokenizer, source="tiny")
    quantized, metrics = run_bnb(dense, skip_modules=["lm_head", "mlp.c_proj", "h.0."])
    assert quantized.model.config.model_type == "a3q_gpt2"
    four_bit, _ = bnb_linear_types()
    first, second = (layer_linears(quantized.model, "gpt2", i) for i in range(2))
    assert all(type(m) is nn.Linear for m in first.values())
    assert type(second["down"]) is nn.Linear and type(second["q"]) is four_bit
    assert set(quantized.layers[1].quantized) == {"q", "k", "v", "o", "up"} and not quantized.layers[0].quantized
    assert metrics["float_linears"][-1] == "transformer.h.1.mlp.c_proj"
    probe = tokens(2, 20)
    torch.testing.assert_close(logits(quantized.model, probe), logits(graph.model, probe), rtol=0, atol=0.2)
    path = save_artifact(quantized, tmp_path / "gpt2", recipe=None, report=[])
    skip = json.loads((path / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert skip[0] == "lm_head" and "transformer.h.0.attn.q_proj" in skip
    reloaded = a3q.load(str(path))
    assert [layer.quantized for layer in reloaded.layers] == [layer.quantized for layer in quantized.layers]
    assert torch.equal(logits(reloaded.model, probe), logits(quantized.model, probe))


@pytest.mark.parametrize("shape, blocksize", [((192, 576), 128), ((40, 48), 64), ((26, 61), 64), ((192, 576), 64)])
def test_four_bit_linears_are_exact_whatever_the_shape(shape, blocksize):
    """bitsandbytes' CPU kernel scales codes with the wrong block when in_features % blocksize != 0: a3q does not."""
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0]).eval()
    module = bnb_format.quantize_linear(linear, "nf4", double_quant=True, blocksize=blocksize)
    weight = bnb_format.dequantize(module)
    assert (weight - linear.weight).norm() / linear.weight.norm() < 0.13  # NF4 on uniform weights: ~0.1
    x = torch.randn(3, shape[1])
    with torch.no_grad():
        torch.testing.assert_close(module(x), nn.functional.linear(x, weight, linear.bias), rtol=0, atol=1e-6)


def test_storage_registry_dispatches_to_bnb():
    linear = nn.Linear(459, 200, bias=False)
    module = bnb_format.quantize_linear(linear, "nf4", double_quant=False, blocksize=128)
    assert storage_of(module) == bnb_format.describe(module)
    # single quantization: codes + one float32 scale per block of 128 + the 16-entry code book + metadata JSON
    blocks = -(-459 * 200 // 128)
    expected = -(-459 * 200 // 2) + 4 * blocks + 64 + storage_of(module)["metadata_bytes"]
    assert weight_bytes(storage_of(module), 459, 200) == expected
    state = module.state_dict()
    assert sum(t.nbytes for t in state.values()) == expected
    assert storage_of(nn.Linear(4, 4)) is None and bnb_format.describe(nn.Linear(4, 4)) is None
