"""The ``lora`` stage: training lowers the loss, runs are reproducible, merge equals the unmerged adapter, the
adapter exports in PEFT's format and reloads with identical logits (a3q and a plain PEFT process), quantized
bases (a3q's GPTQ, bitsandbytes NF4) train and round-trip, and ``merge: true`` on a quantized base is refused.

A tiny random A³ Llama with SmolLM2's vocabulary trains on real ``enwiki/calib`` windows: these tests check
mechanics (gradients, determinism, serialisation), not quality.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import a3q
from a3q.arch import describe
from a3q.calib.sources import enwiki
from a3q.engine import apply_stage
from a3q.io.artifact import save_artifact
from a3q.recipe import RecipeError, StageSpec, parse_recipe
from a3q.registry import StageConfig
from a3q.stages.a3.apply import as_a3_graph
from a3q.stages.lora.config import LoraConfig
from a3q.stages.lora.train import next_token_loss, training_windows
from tests.remote_code import remote_code_logits

FAST = dict(r=4, alpha=8, steps=12, batch_size=2, seq_len=32, lr=1e-2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's kernels are too small to share: a second thread only adds synchronisation (on a busy
    2-core machine, 20× the CPU time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(str(smollm2_path))


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A tiny dense Llama over SmolLM2's vocabulary, its weights drawn with ``seed``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def tiny_graph(tokenizer):
    """A tiny A³-class Llama over SmolLM2's vocabulary (so it trains on real text windows); the same weights in
    every process (seeded), which the data-parallel test relies on."""
    return as_a3_graph(describe(tiny_llama(tokenizer), tokenizer, source="tiny"))


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_graph(tokenizer)


def run_lora(graph, **fields):
    """The stage on a deep copy of ``graph`` (fixtures are never modified); returns (graph, metrics)."""
    return apply_stage(copy.deepcopy(graph), "lora", LoraConfig(**{**FAST, **fields}))


def lora_weights(graph) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in graph.model.named_parameters() if "lora_" in name}


def logits(graph, ids):
    with torch.no_grad():
        return graph.model(input_ids=ids).logits


@pytest.fixture(scope="module")
def probe(tokenizer):
    return training_windows(tokenizer, enwiki("calib"), 32, 2, seed=123)


# ---------------------------------------------------------------- config and recipe rules


class _Quantizing(StageConfig):
    produces_quantized_weights = True


def _spec(index, name, config):
    return StageSpec(index=index, name=name, config=config)


def test_merge_after_a_quantizing_stage_is_refused_naming_stage_and_field():
    earlier = [_spec(0, "a3", StageConfig()), _spec(1, "gptq", _Quantizing())]
    (problem,) = LoraConfig(merge=True).check_in_recipe(earlier)
    assert problem.startswith("merge: cannot merge the adapter into weights that stages[1] (gptq) quantized")
    assert LoraConfig(merge=False).check_in_recipe(earlier) == []
    assert LoraConfig(merge=True).check_in_recipe([]) == []
    unmerged = [_spec(0, "lora", LoraConfig())]
    assert "unmerged adapter of stages[0] (lora)" in LoraConfig().check_in_recipe(unmerged)[0]
    assert LoraConfig().check_in_recipe([_spec(0, "lora", LoraConfig(merge=True))]) == []


def test_recipe_validation_refuses_merge_into_gptq_but_allows_float_merge_then_gptq():
    base = {"model": "smollm2-135m"}
    with pytest.raises(RecipeError) as caught:
        parse_recipe({**base, "stages": [{"stage": "a3", "ratio": 0.2}, {"stage": "gptq"}, {"stage": "lora", "merge": True}]})
    assert caught.value.problems == [
        "stages[2] (lora): merge: cannot merge the adapter into weights that stages[1] (gptq) quantized; set merge: "
        "false (the adapter is kept and exported next to the quantized base) or put this stage before the quantization"
    ]
    parse_recipe({**base, "stages": [{"stage": "lora", "merge": True}, {"stage": "gptq"}]})
    parse_recipe({**base, "stages": [{"stage": "gptq"}, {"stage": "lora"}]})


def test_nothing_may_rewrite_the_linears_under_an_unmerged_adapter():
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "lora"}, {"stage": "gptq"}, {"stage": "a3", "ratio": 0.1}]})
    text = str(caught.value)
    assert "stages[1] (gptq): would change the linears under the unmerged adapter of stages[0] (lora)" in text
    assert "stages[2] (a3): would change the linears under the unmerged adapter of stages[0] (lora)" in text


def test_config_errors_are_reported_at_validation():
    def problems(**fields):
        with pytest.raises(RecipeError) as caught:
            parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "lora", **fields}]})
        return caught.value.problems

    assert problems(split="test") == [
        "stages[0] (lora): split: 'test' contains the held-out test articles; LoRA trains on 'calib' only"
    ]
    assert problems(split="all")[0].startswith("stages[0] (lora): split: 'all' contains the held-out")
    assert problems(target_modules=["q", "qkv"])[0].startswith("stages[0] (lora): target_modules.1:")
    assert problems(target_modules=["q", "q"]) == ["stages[0] (lora): target_modules: each linear may appear once"]
    assert problems(r=0)[0].startswith("stages[0] (lora): r:")
    assert problems(rank=8)[0].startswith("stages[0] (lora): rank: Extra inputs")


# ---------------------------------------------------------------- training on a float (A³) model


def test_training_lowers_the_loss_and_reports(tiny, probe):
    before = next_token_loss(tiny.model, probe).item()
    trained, metrics = run_lora(tiny, steps=30)
    with torch.no_grad():
        after = next_token_loss(trained.model, probe).item()
    assert after < before - 0.03, (before, after)
    assert metrics["train_loss"] < metrics["loss_first"] - 0.03
    assert metrics["steps"] == 30 and len(metrics["loss_curve"]) == 30
    assert metrics["tokens"] == 30 * 2 * 32
    # r·(in + out) per linear: q 48→64, k 48→32, v 48→32, o 64→48, gate/up 48→80, down 80→48, two layers
    assert metrics["trainable_params"] == 2 * 4 * (112 + 80 + 80 + 112 + 128 + 128 + 128)
    assert metrics["note"].startswith("r=4 30 steps, loss ")
    assert trained.adapter is not None and trained.model is trained.adapter.get_base_model()
    assert trained.decoder_linear_params() == tiny.decoder_linear_params()
    assert not any(p.requires_grad for p in trained.model.parameters())  # base and adapter frozen, as PEFT loads them
    assert not trained.model.training


def test_same_seed_same_adapter_and_the_rng_is_left_alone(tiny):
    state = torch.random.get_rng_state()
    first, m1 = run_lora(tiny, dropout=0.1, steps=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    second, m2 = run_lora(tiny, dropout=0.1, steps=4)
    other, m3 = run_lora(tiny, dropout=0.1, steps=4, seed=1)
    a, b, c = lora_weights(first), lora_weights(second), lora_weights(other)
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert m1["loss_curve"] == m2["loss_curve"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_merge_gives_the_logits_of_the_unmerged_adapter(tiny, probe):
    unmerged, _ = run_lora(tiny)
    merged, metrics = run_lora(tiny, merge=True)
    assert merged.adapter is None and metrics["merged"]
    assert not any("lora_" in name for name, _ in merged.model.named_parameters())
    assert all(type(m) is torch.nn.Linear for n, m in merged.model.named_modules() if n.endswith("_proj"))
    assert all(p.requires_grad for p in merged.model.parameters())  # the plain model comes back as it came
    expected, actual = logits(unmerged, probe), logits(merged, probe)
    assert not torch.allclose(expected, logits(tiny, probe), atol=1e-3)  # the adapter changed something
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_adapter_exports_in_peft_format_and_reloads_with_identical_logits(tiny, probe, tmp_path):
    trained, _ = run_lora(tiny)
    expected = logits(trained, probe)
    path = save_artifact(trained, tmp_path / "tiny-lora", recipe=None, report=[])
    assert torch.equal(logits(trained, probe), expected)  # export leaves the in-memory model as it was
    base_keys = load_file(str(path / "model.safetensors")).keys()
    assert not [k for k in base_keys if "lora_" in k or "base_layer" in k]
    adapter_keys = load_file(str(path / "adapter" / "adapter_model.safetensors")).keys()
    assert len(adapter_keys) == 2 * 7 * 2 and all(".lora_A." in k or ".lora_B." in k for k in adapter_keys)
    adapter_config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["base_model_name_or_path"] == str(path.resolve())
    manifest = json.loads((path / "a3q.json").read_text())
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "model.safetensors"} <= manifest["files"].keys()
    assert manifest["structure"]["adapter"]["r"] == 4 and manifest["structure"]["adapter"]["path"] == "adapter"

    reloaded = a3q.load(str(path))
    assert reloaded.adapter is not None
    assert torch.equal(logits(reloaded, probe), expected)
    # a process without a3q: remote-code base + PeftModel.from_pretrained(base, path/adapter)
    assert torch.equal(remote_code_logits(path, probe, "A3LlamaForCausalLM", adapter=path / "adapter"), expected)


def test_dense_gpt2_gets_adapters_on_its_split_projections(tokenizer, probe):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=48, n_layer=2, n_head=4, n_positions=128, n_inner=80)
    dense = describe(GPT2LMHeadModel(config).eval(), tokenizer, source="tiny-gpt2")
    unmerged, _ = run_lora(dense, steps=3, target_modules=["q", "v", "down"])
    assert len(lora_weights(unmerged)) == 2 * 3 * 2
    merged, _ = run_lora(dense, steps=3, target_modules=["q", "v", "down"], merge=True)
    torch.testing.assert_close(logits(merged, probe), logits(unmerged, probe), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"target_modules: \['gate'\] do not exist in a gpt2 model"):
        run_lora(dense, target_modules=["gate"])


def test_a_second_adapter_needs_the_first_merged(tiny):
    trained, _ = run_lora(tiny, steps=1)
    with pytest.raises(ValueError, match="already carries an unmerged LoRA adapter"):
        apply_stage(trained, "lora", LoraConfig(**FAST))


# ---------------------------------------------------------------- quantized bases


@pytest.fixture(scope="module")
def tiny_gptq(tiny, tokenizer):
    windows = training_windows(tokenizer, enwiki("calib"), 32, 4, seed=0)
    return apply_stage(copy.deepcopy(tiny), "gptq", windows=windows, bits=4, group_size=16)[0]


def test_gptq_base_trains_through_the_dequantised_weight_and_round_trips(tiny_gptq, probe, tmp_path):
    from peft.tuners.lora.gptq import GPTQLoraLinear

    from a3q.io.peft_modules import is_gptq_linear

    assert any(is_gptq_linear(m) for m in tiny_gptq.model.modules())
    codes_before = {n: b.clone() for n, b in tiny_gptq.model.named_buffers() if n.endswith("qweight")}
    before = next_token_loss(tiny_gptq.model, probe).item()
    trained, metrics = run_lora(tiny_gptq, steps=30)
    wrapped = [m for m in trained.model.modules() if isinstance(m, GPTQLoraLinear)]
    assert len(wrapped) == 2 * 7
    # gradients reached both factors through GPTQLinear: lora_B left its zero init, lora_A moved from its init
    init, _ = run_lora(tiny_gptq, steps=1, lr=1e-12)
    weights, initial = lora_weights(trained), lora_weights(init)
    assert all(not torch.equal(weights[k], initial[k]) for k in weights)
    assert all(torch.equal(b, codes_before[n]) for n, b in trained.model.named_buffers() if n in codes_before)
    with torch.no_grad():
        assert next_token_loss(trained.model, probe).item() < before - 0.05
    assert metrics["train_loss"] < metrics["loss_first"]

    expected = logits(trained, probe)
    path = save_artifact(trained, tmp_path / "tiny-gptq-lora", recipe=None, report=[])
    assert not [k for k in load_file(str(path / "model.safetensors")) if "lora_" in k or "base_layer" in k]
    reloaded = a3q.load(str(path))
    assert any(isinstance(m, GPTQLoraLinear) for m in reloaded.model.modules())
    assert torch.equal(logits(reloaded, probe), expected)


def test_merge_into_a_quantized_model_fails_clearly_at_run_time(tiny_gptq):
    expected = r"merge: the adapter cannot be merged into quantized weights, e\.g\. model\.layers\.0\.self_attn\.q_proj \(GPTQLinear\)"
    with pytest.raises(ValueError, match=expected):
        run_lora(tiny_gptq, merge=True)


@pytest.fixture(scope="module")
def tiny_nf4(tiny):
    return apply_stage(copy.deepcopy(tiny), "bnb", quant_type="nf4")[0]


def test_qlora_on_nf4_trains_and_round_trips(tiny_nf4, probe, tmp_path):
    before = next_token_loss(tiny_nf4.model, probe).item()
    trained, metrics = run_lora(tiny_nf4, steps=30)
    with torch.no_grad():
        assert next_token_loss(trained.model, probe).item() < before - 0.05
    expected = logits(trained, probe)
    path = save_artifact(trained, tmp_path / "tiny-nf4-lora", recipe=None, report=[])
    assert not [k for k in load_file(str(path / "model.safetensors")) if "lora_" in k or "base_layer" in k]
    reloaded = a3q.load(str(path))
    assert reloaded.adapter is not None
    assert torch.equal(logits(reloaded, probe), expected)
