"""The ``lora`` stage's loss, teacher and training-text fields: what recipe validation refuses before any model
loads (each problem names the stage and the field) and the text sources it accepts (the calibration's)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from a3q.engine import apply_stage
from a3q.recipe import RecipeError, parse_recipe
from a3q.stages.lora.config import LoraConfig
from a3q.stages.lora.train import training_windows
from tests.stages.lora.test_kd_stage import save_teacher
from tests.stages.lora.test_lora import FAST, one_thread, tiny, tokenizer  # noqa: F401


def problems(*stages, model="smollm2-135m"):
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"model": model, "stages": list(stages)})
    return caught.value.problems


def test_defaults_keep_the_lm_loss_and_a_kd_recipe_validates():
    config = LoraConfig()
    assert config.loss == "lm" and not config.distils and config.source().describe() == "enwiki/calib"
    recipe = parse_recipe({"model": "smollm2-135m", "stages": [
        {"stage": "a3", "ratio": 0.2}, {"stage": "lora", "loss": "kd+lm", "kd_weight": 0.3, "temperature": 2.0}]})
    assert recipe.stages[1].config.teacher == "input" and recipe.stages[1].config.teacher_top_k == 64


def test_a_teacher_path_that_does_not_exist_is_refused(tmp_path):
    missing = str(tmp_path / "nowhere")
    (problem,) = problems({"stage": "lora", "loss": "kd", "teacher": missing})
    assert problem.startswith(f"stages[0] (lora): teacher: '{missing}' is neither a known alias")


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, tokenizer):
    folder = save_teacher(tokenizer, tmp_path / "teacher", seed=1)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 32000}))
    (problem,) = problems({"stage": "lora", "loss": "kd", "teacher": str(folder)})
    assert problem == (f"stages[0] (lora): teacher: '{folder}' has a vocabulary of 32,000 tokens, the model "
                       "'smollm2-135m' 49,152; distillation compares them token by token and needs the same tokenizer")


def test_a_teacher_with_the_same_vocabulary_size_but_another_tokenizer_is_refused(tmp_path, tokenizer):
    folder = save_teacher(tokenizer, tmp_path / "teacher", seed=1)
    parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "lora", "loss": "kd", "teacher": str(folder)}]})
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = (token for token, index in vocab.items() if index in (1000, 1001))
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two tokens trade ids: same size, other tokenizer
    (folder / "tokenizer.json").write_text(json.dumps(data))
    (problem,) = problems({"stage": "lora", "loss": "kd", "teacher": str(folder)})
    assert problem.startswith(f"stages[0] (lora): teacher: '{folder}' has another tokenizer than the model "
                              "'smollm2-135m': token id 1,000 is ")


def test_teacher_top_k_larger_than_the_vocabulary_is_refused(tmp_path, tokenizer):
    (problem,) = problems({"stage": "lora", "loss": "kd", "teacher_top_k": 50_000})
    assert problem == ("stages[0] (lora): teacher_top_k: 50,000 is larger than the teacher's vocabulary "
                       "(49,152 tokens)")
    folder = save_teacher(tokenizer, tmp_path / "teacher", seed=1)
    parse_recipe({"model": str(folder), "stages": [{"stage": "lora", "loss": "kd", "teacher_top_k": 49_152}]})


def test_teacher_fields_without_a_distilling_loss_are_refused():
    assert problems({"stage": "lora", "teacher": "input"}) == [
        "stages[0] (lora): teacher: only applies to loss: kd or kd+lm (this stage trains with loss: lm)"]
    assert problems({"stage": "lora", "teacher_top_k": 8})[0].startswith("stages[0] (lora): teacher_top_k: only")
    assert problems({"stage": "lora", "loss": "kd", "kd_weight": 0.5}) == [
        "stages[0] (lora): kd_weight: only applies to loss: kd+lm (loss: kd is the distillation loss alone)"]
    assert problems({"stage": "lora", "loss": "kd", "temperature": 0})[0].startswith("stages[0] (lora): temperature:")
    assert problems({"stage": "lora", "loss": "distil"})[0].startswith("stages[0] (lora): loss:")
    assert problems({"stage": "lora", "loss": "kd+lm", "kd_weight": 1.0})[0].startswith("stages[0] (lora): kd_weight:")


def test_training_on_held_out_text_is_refused(tmp_path):
    assert problems({"stage": "lora", "split": "test"}) == [
        "stages[0] (lora): split: 'test' contains the held-out test articles; LoRA trains on 'calib' only"]
    # news/calib lies inside news/all, which the evaluation before it measures on
    assert problems({"stage": "evaluate", "corpus": "news", "split": "all"},
                    {"stage": "lora", "loss": "kd", "corpus": "news"}) == [
        "stages[1] (lora): corpus: news/calib is what stages[0] (evaluate) measures on (held out); train on other text"]
    notes = tmp_path / "notes.txt"
    notes.write_text("some text " * 100)
    assert problems({"stage": "evaluate", "path": str(notes)}, {"stage": "lora", "path": str(notes)})[0].startswith(
        f"stages[1] (lora): path: path '{notes}' is what stages[0] (evaluate) measures on")
    parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "evaluate"}, {"stage": "lora", "path": str(notes)}]})


def test_training_text_takes_the_calibration_fields(tmp_path):
    """``path``, ``dataset`` and chat records with the calibration's checks (:mod:`a3q.calib.sources`)."""
    assert problems({"stage": "lora", "path": str(tmp_path / "none.jsonl")})[0].startswith(
        "stages[0] (lora): path: '")
    assert "give exactly one of corpus, path or dataset" in problems(
        {"stage": "lora", "corpus": "enwiki", "path": str(tmp_path)})[0]
    assert problems({"stage": "lora", "dataset": "json"}) == [
        "stages[0] (lora): data_files: dataset 'json' reads local files; name them with data_files"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": "x"}) + "\n")
    assert "no field 'text'" in problems({"stage": "lora", "path": str(rows)})[0]
    parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "lora", "path": str(rows), "text_field": "body"}]})


def test_chat_records_train(tiny, tmp_path):
    chat = tmp_path / "chat.jsonl"
    turn = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris is the capital and largest city of France. " * 3}]
    chat.write_text("\n".join(json.dumps({"messages": turn}) for _ in range(8)) + "\n")
    config = LoraConfig(**{**FAST, "path": str(chat), "steps": 2})
    pool = training_windows(tiny.tokenizer, config, config.seq_len, 4, 0)
    assert pool.shape == (4, 32)
    assert "France" in tiny.tokenizer.decode(pool.flatten())
    _, metrics = apply_stage(copy.deepcopy(tiny), "lora", config)
    assert metrics["steps"] == 2 and torch.isfinite(torch.tensor(metrics["loss_first"]))


def test_the_memory_estimate_counts_the_teacher_pass_and_its_cache():
    from a3q.pipeline.plan import ModelShape

    shape = ModelShape(hidden=576, intermediate=1536, heads=9, layers=30, vocab=49152, width=4)
    assert "lora_teacher" not in LoraConfig().memory_estimate(shape, 512)
    small, large = (LoraConfig(loss="kd", teacher_top_k=k, steps=10, seq_len=128).memory_estimate(shape, 512)
                    for k in (8, 64))
    weights = (30 * (4 * 576 * 576 + 3 * 576 * 1536) + 49152 * 576) * 4
    assert small["lora_teacher"] > weights
    assert large["lora_teacher"] - small["lora_teacher"] == 10 * 127 * 8 * (64 - 8)  # the cached targets


def test_distill_layers_are_checked_against_both_models(tmp_path, tokenizer):
    assert problems({"stage": "lora", "loss": "kd", "distill_layers": [3, 30]}) == [
        "stages[0] (lora): distill_layers: the model 'smollm2-135m' has 30 decoder layers (0 … 29); 30 is not one"]
    assert problems({"stage": "lora", "loss": "kd", "distill_layers": [3, 3]})[0].startswith(
        "stages[0] (lora): distill_layers: each layer index may appear once")
    assert problems({"stage": "lora", "loss": "kd", "distill_weight": 2.0}) == [
        "stages[0] (lora): distill_weight: only applies with distill_layers"]
    assert problems({"stage": "lora", "distill_layers": [1]})[0].startswith("stages[0] (lora): distill_layers: only")
    folder = save_teacher(tokenizer, tmp_path / "teacher", seed=1)  # 2 layers of width 48, SmolLM2's vocabulary
    assert problems({"stage": "lora", "loss": "kd", "teacher": str(folder), "distill_layers": [2]})[0] == (
        f"stages[0] (lora): distill_layers: the teacher '{folder}' has 2 decoder layers (0 … 1); 2 is not one")
    assert problems({"stage": "lora", "loss": "kd", "teacher": str(folder), "distill_layers": [1]})[0] == (
        "stages[0] (lora): distill_layers: the teacher's hidden size 48 differs from the model's 576; hidden "
        "states can only be matched at the same width")
