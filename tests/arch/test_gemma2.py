"""Gemma 2 adapter (``a3q.arch.gemma2``) and its compressed class (``a3q_gemma2``).

A tiny random Gemma 2 goes through the shared family checks (:mod:`tests.arch.family_checks`): sliding and global
layers alternate with a window shorter than the test sequence, both soft-caps are on and small enough to bend the
logits they cap (q/k are scaled up so the attention logits reach the cap), and the ``(1 + w)`` norms have non-zero
weights. Then A³ runs end to end through the engine on a tiny Gemma 2 saved to a folder (calibration, A³, evaluate,
export), and the artifact reloads to the same logits.
"""

from __future__ import annotations

import math

import torch
from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

from a3q.arch.auto import to_a3_model
from tests.arch.family_checks import check_family, logits, token_ids

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
#: soft-caps well inside the range of the tiny model's logits (see test_softcapping_changes_the_logits)
ATTENTION_CAP, FINAL_CAP = 1.0, 0.3


def tiny_gemma2(vocab_size: int = 97, **overrides) -> Gemma2ForCausalLM:
    """Random tiny Gemma 2: 2 KV groups of 2 heads, head dim 16, window 5, non-trivial norms, active soft-caps."""
    torch.manual_seed(0)
    config = Gemma2Config(**{
        "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 24,
        "sliding_window": 5, "layer_types": LAYER_TYPES, "max_position_embeddings": 64,
        "attn_logit_softcapping": ATTENTION_CAP, "final_logit_softcapping": FINAL_CAP, **overrides})
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0.0, 0.3)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(6.0)  # scaled q·k up to ~2: the attention soft-cap bends it
    return model


def test_softcapping_changes_the_logits():
    """Guards the test model: without the caps the logits differ, so the family checks below see both caps."""
    ids = token_ids(97, seq=14)
    capped = logits(tiny_gemma2(), ids)
    for overrides in ({"attn_logit_softcapping": None}, {"final_logit_softcapping": None}):
        assert (logits(tiny_gemma2(**overrides), ids) - capped).abs().max() > 1e-2


def test_family_checks(tmp_path):
    """Full rank bit-identical, kept rows = zeroed dense, decoding past the window of 5 = full forward, remote-code
    export, layer-by-layer NLL = whole-model NLL before and after the A³ stage."""
    dense = tiny_gemma2()
    config = to_a3_model(dense).config
    assert (config.model_type, config.layer_types, config.sliding_window) == ("a3q_gemma2", LAYER_TYPES, 5)
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (ATTENTION_CAP, FINAL_CAP)
    check_family(dense, tmp_path, r_qk=8, r_vo=10, r_ff=20, seq=14, prefix=3)


def test_a3_recipe_end_to_end(tmp_path, smollm2_path):
    """A³ through the engine on a tiny Gemma 2 folder (SmolLM2's tokenizer, real enwiki text): every layer shrinks,
    perplexity is finite before and after, and the exported artifact reloads to the same logits."""
    from a3q.engine import run_recipe
    from a3q.io.loading import load_graph
    from a3q.recipe import parse_recipe

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path))
    folder = tmp_path / "gemma2"
    tiny_gemma2(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    evaluate = {"stage": "evaluate", "seq_len": 64, "max_windows": 2}
    recipe = parse_recipe({
        "model": str(folder), "device": "cpu", "dtype": "float32",
        "calibration": {"windows": 4, "seq_len": 64, "seed": 0},
        "stages": [evaluate, {"stage": "a3", "allocation": "uniform", "ratio": 0.3}, evaluate,
                   {"stage": "export", "path": str(tmp_path / "artifact")}]}, check_model=False)
    result = run_recipe(recipe, tmp_path / "run", show_table=False)

    rows = result.report.rows
    assert math.isfinite(rows[1]["ppl"]) and math.isfinite(rows[3]["ppl"]), rows  # before and after A³
    assert rows[2]["params"] < rows[0]["params"]
    model = result.graph.model
    assert model.config.model_type == "a3q_gemma2"
    ranks = rows[2]["ranks"]  # uniform allocation: the same sizes in every layer
    assert ranks["qk"] < 16 and ranks["vo"] < 16 and ranks["ff"] < 48, ranks  # dense: head dim 16, intermediate 48
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        assert (attention.qk_head_dim, attention.vo_head_dim, mlp.intermediate_size) == (ranks["qk"], ranks["vo"],
                                                                                         ranks["ff"])
        assert attention.q_proj.weight.shape == (4 * ranks["qk"], 32) and attention.o_proj.weight.shape == (
            32, 4 * ranks["vo"]) and mlp.down_proj.weight.shape == (32, ranks["ff"])

    ids = torch.arange(100, 132).reshape(1, 32)
    reloaded = load_graph(tmp_path / "artifact").model
    assert type(reloaded) is type(model)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.isfinite(expected).all()
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
