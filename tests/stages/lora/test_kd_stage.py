"""Distillation in the ``lora`` stage on the tiny random A³ Llama of ``test_lora.py`` (real enwiki windows).

The teacher is a tiny dense Llama saved as a model folder (``teacher: PATH``). Checked: a teacher equal to the
student gives loss 0 and leaves the adapter at its init (zero gradient), a different teacher is approached, the
teacher's targets are cached in the output folder and a second run reads them back (and trains identically),
``kd+lm`` mixes, and QLoRA, GPTQ, merge and export keep working with ``loss: kd``. Mechanics, not quality.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

import a3q
from a3q.engine import apply_stage
from a3q.io.artifact import save_artifact
from a3q.pipeline.context import StageContext
from a3q.stages.lora.config import LoraConfig
from a3q.stages.lora.distill import kd_loss, teacher_targets
from a3q.stages.lora.stage import lora
from tests.stages.lora.test_lora import FAST, logits, lora_weights, one_thread, probe, tiny, tiny_llama, tokenizer  # noqa: F401

KD = dict(FAST, loss="kd", teacher_top_k=16, steps=8)


def save_teacher(tokenizer, folder, seed: int):
    """The student's dense base (``seed`` 0: the very same weights) or another tiny Llama, as a model folder. The
    other one's final norm is scaled up: a random tiny model's next-token distribution is nearly uniform, and a
    peaked one gives the student something to learn."""
    model = tiny_llama(tokenizer, seed)
    if seed != 0:
        with torch.no_grad():
            model.model.norm.weight.mul_(30.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def same_teacher(tokenizer, tmp_path_factory):
    return save_teacher(tokenizer, tmp_path_factory.mktemp("same-teacher"), seed=0)


@pytest.fixture(scope="module")
def other_teacher(tokenizer, tmp_path_factory):
    return save_teacher(tokenizer, tmp_path_factory.mktemp("other-teacher"), seed=1)


def run_kd(graph, **fields):
    return apply_stage(copy.deepcopy(graph), "lora", LoraConfig(**{**KD, **fields}))


def teacher_kl(graph, teacher_folder, ids, k=16):
    """The bucketed KL of ``graph`` to the teacher on ``ids`` (mean per prediction)."""
    teacher = a3q.load(str(teacher_folder)).model
    with torch.no_grad():
        targets = teacher_targets(teacher(input_ids=ids).logits[:, :-1], k, 1.0)
        return float(kd_loss(logits(graph, ids)[:, :-1], targets, 1.0, reduction="mean"))


def test_the_student_itself_as_teacher_gives_zero_loss(tiny, same_teacher, probe):
    """The loss is 0 up to float32 rounding (the A³ class computes the same function as the dense teacher); that
    its gradient is 0 is checked in float64 in ``test_distill.py`` (AdamW would turn float32 noise into lr-sized
    steps, so the adapter's weights are not a test of it here)."""
    assert torch.allclose(logits(tiny, probe), logits(a3q.load(str(same_teacher)), probe), atol=1e-5)
    _, metrics = run_kd(tiny, teacher=str(same_teacher), steps=2)
    assert abs(metrics["loss_first"]) < 1e-6
    assert metrics["loss"] == "kd" and metrics["teacher_top_k"] == 16 and not metrics["teacher_cache_reused"]


def test_kd_moves_the_student_towards_the_teacher_and_reports_the_cache(tiny, other_teacher, probe):
    before = teacher_kl(tiny, other_teacher, probe)
    trained, metrics = run_kd(tiny, teacher=str(other_teacher), steps=20)
    assert teacher_kl(trained, other_teacher, probe) < before - 0.05  # on held-back windows (the loss is noisy)
    pool = 20 * 2  # steps × batch windows of 32 tokens: 31 predictions, 16 kept tokens each
    assert metrics["teacher_cache_bytes"] == pool * 31 * (16 * 8 + 4)
    assert 0.0 < metrics["teacher_tail_mass"] < 1.0 and metrics["teacher_seconds"] > 0
    assert metrics["teacher_cache"] is None  # outside a recipe the cache lives in a temporary folder


def test_kd_plus_lm_mixes_the_two_losses(tiny, other_teacher):
    _, kd = run_kd(tiny, teacher=str(other_teacher), steps=1)
    _, lm = apply_stage(copy.deepcopy(tiny), "lora", LoraConfig(**{**FAST, "steps": 1}))
    _, mixed = run_kd(tiny, teacher=str(other_teacher), steps=1, loss="kd+lm", kd_weight=0.25)
    assert mixed["loss_first"] == pytest.approx(0.25 * kd["loss_first"] + 0.75 * lm["loss_first"], rel=1e-5)
    assert mixed["kd_weight"] == 0.25


def test_the_cache_is_written_once_and_read_back_by_a_second_run(tiny, other_teacher, tmp_path):
    config = LoraConfig(**{**KD, "teacher": str(other_teacher), "steps": 4})

    def run():
        context = StageContext(label="stages[1] (lora)", output_dir=tmp_path, recipe_raw={"model": "tiny"},
                               model="tiny")
        return lora(copy.deepcopy(tiny), config, context), context.metrics

    first, m1 = run()
    (cached,) = (tmp_path / "lora-teacher").glob("*.safetensors")
    assert cached.name.startswith("stages-1-lora-rank0of1-") and m1["teacher_cache"] == str(cached)
    with safe_open(str(cached), framework="pt") as handle:
        assert handle.metadata()["top_k"] == "16" and set(handle.keys()) == {"indices", "logprobs", "tail"}
    stamp = cached.stat().st_mtime_ns
    second, m2 = run()
    assert m2["teacher_cache_reused"] and m2["teacher_seconds"] == 0.0 and cached.stat().st_mtime_ns == stamp
    assert m1["loss_curve"] == m2["loss_curve"]  # a hit trains exactly as the miss did
    a, b = lora_weights(first), lora_weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    cached.write_bytes(b"not safetensors")  # a broken file is recomputed, not trusted
    _, m3 = run()
    assert not m3["teacher_cache_reused"] and m3["loss_curve"] == m1["loss_curve"]
    assert [p.name for p in (tmp_path / "lora-teacher").iterdir()] == [cached.name]  # no temporary file left


def test_a_different_temperature_or_k_is_another_cache_file(tiny, other_teacher, tmp_path):
    context = StageContext(label="stages[0] (lora)", output_dir=tmp_path, recipe_raw={"model": "tiny"})
    for fields in ({}, {"temperature": 2.0}, {"teacher_top_k": 8}):
        lora(copy.deepcopy(tiny), LoraConfig(**{**KD, "teacher": str(other_teacher), "steps": 1, **fields}), context)
    assert len(list((tmp_path / "lora-teacher").glob("*.safetensors"))) == 3


def test_kd_on_quantized_bases_with_merge_and_export(tiny, other_teacher, probe, tmp_path):
    """QLoRA (nf4) and a3q's GPTQ train with kd; the nf4 adapter exports and reloads; a float base merges."""
    from a3q.calib.sources import enwiki
    from a3q.stages.lora.train import training_windows

    nf4 = apply_stage(copy.deepcopy(tiny), "bnb", quant_type="nf4")[0]
    windows = training_windows(tiny.tokenizer, enwiki("calib"), 32, 4, seed=0)
    gptq = apply_stage(copy.deepcopy(tiny), "gptq", windows=windows, bits=4, group_size=16)[0]
    for base in (nf4, gptq):
        trained, _ = run_kd(base, teacher=str(other_teacher), steps=6)
        assert teacher_kl(trained, other_teacher, probe) < teacher_kl(base, other_teacher, probe)
    expected = logits(trained, probe)
    path = save_artifact(trained, tmp_path / "kd-gptq", recipe=None, report=[])
    assert json.loads((path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert torch.equal(logits(a3q.load(str(path)), probe), expected)
    unmerged, _ = run_kd(tiny, teacher=str(other_teacher), steps=4)
    merged, metrics = run_kd(tiny, teacher=str(other_teacher), steps=4, merge=True)
    assert metrics["merged"] and merged.adapter is None
    torch.testing.assert_close(logits(merged, probe), logits(unmerged, probe), rtol=1e-5, atol=1e-5)


def test_distill_layers_cache_the_teachers_hidden_states_and_train_towards_them(tiny, same_teacher, other_teacher,
                                                                              tmp_path):
    _, same = run_kd(tiny, teacher=str(same_teacher), steps=1, distill_layers=[0, 1])
    assert abs(same["loss_first"]) < 1e-6  # the same weights: logits and hidden states agree
    context = StageContext(label="stages[0] (lora)", output_dir=tmp_path, recipe_raw={"model": "tiny"})
    config = LoraConfig(**{**KD, "teacher": str(other_teacher), "steps": 3, "distill_layers": [1],
                           "distill_weight": 10.0})
    lora(copy.deepcopy(tiny), config, context)
    (cached,) = (tmp_path / "lora-teacher").glob("*.safetensors")
    with safe_open(str(cached), framework="pt") as handle:
        assert handle.get_slice("hidden").get_shape() == [6, 1, 31, 48]
    m = context.metrics
    assert m["teacher_cache_bytes"] == 6 * 31 * (16 * 8 + 4 + 48 * 4) and m["distill_layers"] == [1]
    _, plain = run_kd(tiny, teacher=str(other_teacher), steps=3)
    assert m["loss_first"] > plain["loss_first"]  # the MSE term adds to the kd loss
