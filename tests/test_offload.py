"""Offloaded models (a3q.layer_store.offloaded): the same results as in memory, with one decoder layer materialized at a time.

Tiny random models check the mechanics for every kind of stage (pass, planner with probes, swapped modules, resume,
export, perplexity, GPT-2's converted names); the real-model check is the last test (SmolLM2, through ``a3q run``).
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from a3q.arch import decoder_layers
from a3q.checkpoint.run import RunCheckpoint
from a3q.checkpoint.stops import RunStopped, StopSignals
from a3q.io.loading import load_graph
from a3q.metrics.layerwise import layerwise_window_nll
from a3q.metrics.perplexity import perplexity
from a3q.numerics import NonFiniteError
from a3q.layer_store.folders import STORE_PREFIX
from a3q.layer_store.hold import hold_layer
from a3q.pipeline.runner import run_pipeline
from a3q.recipe import RecipeError, parse_recipe
from a3q.registry import build_stages
from tests.checkpoint.test_pass_checkpoint import STAGE_LISTS, WINDOWS
from tests.stages.a3.test_pipeline_tiny import tiny_gpt2, tiny_llama
from tests.stop_at import SignalAt


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(str(smollm2_path))


def _save(model, folder, tokenizer):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def llama_folder(tmp_path, tokenizer):
    model = tiny_llama()
    model.config.num_hidden_layers = 4
    torch.manual_seed(0)
    return _save(type(model)(model.config).eval(), tmp_path / "llama", tokenizer)


def _recipe(folder, stages, **header):
    return parse_recipe({"model": str(folder), "stages": stages, **header}, check_model=False)


def _run(graph, recipe, checkpoint=None):
    workers = build_stages(recipe)
    return run_pipeline(graph, WINDOWS, workers, progress=False, checkpoint=checkpoint)


def _layers_equal(in_memory, offloaded):
    """Every decoder layer of the offloaded graph (held in turn) equals the in-memory one, tensor for tensor."""
    assert in_memory.model.config.to_dict() == offloaded.model.config.to_dict()
    for index in range(len(in_memory.layers)):
        expected = decoder_layers(in_memory.model, in_memory.family)[index].state_dict()
        with hold_layer(offloaded, index) as layer:
            got = layer.state_dict()
            assert expected.keys() == got.keys()
            different = [k for k in expected if expected[k].dtype != got[k].dtype or not expected[k].equal(got[k])]
            assert not different, f"layer {index}: {different}"


def _all_released(graph):
    layers = decoder_layers(graph.model, graph.family)
    return all(t.is_meta for layer in layers for t in [*layer.parameters()])


@pytest.mark.parametrize("name", list(STAGE_LISTS))
def test_an_offloaded_pass_equals_the_in_memory_one(tmp_path, llama_folder, name):
    recipe = _recipe(llama_folder, STAGE_LISTS[name])
    expected = _run(load_graph(llama_folder), recipe)
    graph = load_graph(llama_folder, offload="disk", offload_near=tmp_path)
    assert _all_released(graph)  # nothing of the decoder was read at load
    offloaded = _run(graph, recipe)
    assert _all_released(offloaded)  # each layer went back to its file after the pass
    assert offloaded.layer_store.changed_layers() == list(range(4))
    assert len(list(offloaded.layer_store.folder.glob("layer-*.safetensors"))) == 4
    _layers_equal(expected, offloaded)


def test_export_streams_shards_that_load_back_to_the_same_model(tmp_path, llama_folder):
    from a3q.io.artifact import save_artifact

    recipe = _recipe(llama_folder, STAGE_LISTS["a3+gptq"])
    expected = _run(load_graph(llama_folder), recipe)
    offloaded = _run(load_graph(llama_folder, offload="cpu"), recipe)
    save_artifact(expected, tmp_path / "memory", recipe=None, report=[], max_shard_size="30KB")
    save_artifact(offloaded, tmp_path / "offloaded", recipe=None, report=[], max_shard_size="30KB")
    shards = sorted(p.name for p in (tmp_path / "offloaded").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "offloaded" / "model.safetensors.index.json").is_file()
    ids = WINDOWS[:2]
    logits = [load_graph(tmp_path / folder).model(input_ids=ids).logits for folder in ("memory", "offloaded")]
    assert torch.equal(*logits)
    remote = AutoModelForCausalLM.from_pretrained(str(tmp_path / "offloaded"), trust_remote_code=True)
    assert torch.allclose(remote(input_ids=ids).logits, logits[0], rtol=0, atol=1e-5)


def test_layerwise_perplexity_equals_the_whole_model_forward(tmp_path, llama_folder, tokenizer):
    dense = load_graph(llama_folder)
    offloaded = load_graph(llama_folder, offload="disk", offload_near=tmp_path)
    expected = perplexity(dense.model, WINDOWS, batch_size=4, progress=False)
    got = perplexity(offloaded.model, WINDOWS, batch_size=4, progress=False,
                     layerwise=lambda w: layerwise_window_nll(offloaded, w, 4, progress=False))
    assert got.predicted_tokens == expected.predicted_tokens
    assert got.nll_sum == pytest.approx(expected.nll_sum, rel=1e-6)
    assert _all_released(offloaded)


def test_gpt2_is_converted_layer_by_layer_on_load(tmp_path, tokenizer):
    folder = _save(tiny_gpt2(), tmp_path / "gpt2", tokenizer)
    dense = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    offloaded = load_graph(folder, offload="disk", offload_near=tmp_path)
    assert offloaded.model.config.model_type == "a3q_gpt2"
    nll = layerwise_window_nll(offloaded, WINDOWS, 3, progress=False)
    logits = dense(input_ids=WINDOWS).logits.double()
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 WINDOWS[:, 1:].reshape(-1), reduction="none")
    assert torch.allclose(nll, expected.reshape(WINDOWS.shape[0], -1).sum(1), rtol=1e-5)


def test_a_stopped_offloaded_pass_resumes_to_the_uninterrupted_result(tmp_path, llama_folder, monkeypatch):
    recipe = _recipe(llama_folder, STAGE_LISTS["a3+gptq"])
    expected = _run(load_graph(llama_folder), recipe)

    def offloaded_run(resume: bool, stop_at: str | None = None):
        graph = load_graph(llama_folder, offload="disk", offload_near=tmp_path)
        with StopSignals(points=SignalAt(stop_at) if stop_at else None) as stops:
            checkpoint = RunCheckpoint.open(tmp_path / "out", recipe, llama_folder, resume=resume, restart=False,
                                            stops=stops)
            return _run(graph, recipe, checkpoint.pass_checkpoint(0, "test pass"))

    with pytest.raises(RunStopped):
        offloaded_run(resume=False, stop_at="group0.layer1:TERM")
    resumed = offloaded_run(resume=True)
    assert _all_released(resumed)
    _layers_equal(expected, resumed)


def test_the_store_goes_with_the_model(tmp_path, llama_folder):
    graph = _run(load_graph(llama_folder, offload="disk", offload_near=tmp_path),
                 _recipe(llama_folder, STAGE_LISTS["svd_llm"]))
    store = graph.layer_store.folder
    assert store.is_dir() and store.name.startswith(STORE_PREFIX) and store.parent == tmp_path
    del graph
    gc.collect()
    assert not store.exists()


def test_a_non_finite_layer_is_named_when_it_is_first_read(tmp_path, tokenizer):
    model = tiny_llama()
    with torch.no_grad():
        decoder_layers(model, "llama")[1].mlp.down_proj.weight[0, 0] = float("nan")
    graph = load_graph(_save(model, tmp_path / "nan", tokenizer), offload="disk", offload_near=tmp_path)
    with hold_layer(graph, 0):
        pass
    with pytest.raises(NonFiniteError, match=r"load: non-finite values in model\.layers\.1\.mlp\.down_proj\.weight \(layer 1\)"):
        with hold_layer(graph, 1):
            pass


@pytest.mark.parametrize(("stage", "problem"), [
    ({"stage": "bnb"}, "stages[0] (bnb): cannot run with offload: disk (bitsandbytes"),
    ({"stage": "lora", "steps": 1}, "stages[0] (lora): cannot run with offload: disk (training"),
    ({"stage": "evaluate", "cache_chunk": 64}, "stages[0] (evaluate): cannot run with offload: disk (cache_chunk"),
])
def test_stages_that_need_the_whole_model_are_refused_at_validation(llama_folder, stage, problem):
    with pytest.raises(RecipeError) as refused:
        _recipe(llama_folder, [stage], offload="disk")
    assert any(p.startswith(problem) for p in refused.value.problems), refused.value.problems


def test_offload_auto_offloads_only_when_the_model_does_not_fit(llama_folder, monkeypatch):
    from a3q import preflight

    from a3q.checks import text_bytes

    recipe = _recipe(llama_folder, STAGE_LISTS["a3+gptq"], device="cpu")
    text = text_bytes(recipe)  # what preflight counts for the calibration text
    whole = preflight.estimate_memory(recipe, offload="none", text=text)["host_total"]
    offloaded = preflight.estimate_memory(recipe, offload="disk", text=text)["host_total"]
    assert offloaded < whole
    monkeypatch.setattr(preflight, "available_host_memory", lambda: int(whole / preflight.HEADROOM) + 1024)
    plan = preflight.preflight(recipe)
    assert plan.problems == [] and plan.offload == "none"
    between = (offloaded + whole) // 2  # fits offloaded, not whole
    monkeypatch.setattr(preflight, "available_host_memory", lambda: int(between / preflight.HEADROOM))
    plan = preflight.preflight(recipe)
    assert plan.problems == [] and plan.offload == "disk" and plan.estimate["offload"] == "disk"
    monkeypatch.setattr(preflight, "available_host_memory", lambda: int(offloaded / 2))
    problems = preflight.preflight(recipe).problems
    assert problems and "memory:" in problems[0]
    # a stage that needs the whole model: auto cannot offload, and says why
    blocked = _recipe(llama_folder, [{"stage": "bnb"}], device="cpu")
    monkeypatch.setattr(preflight, "available_host_memory", lambda: 1 << 20)
    problems = preflight.preflight(blocked).problems
    assert any("offload: auto would offload the layers, but stages[0] (bnb)" in p for p in problems), problems


def test_stale_offload_stores_are_removed_and_nothing_else(tmp_path):
    """A store a killed run left (``kill -9``: no cleanup ran) is removed by the next run in the folder; a live
    store, an unmarked look-alike, a link, a store holding a file a3q did not write and a marker that is a link stay."""
    import json
    import subprocess
    import sys

    from a3q.layer_store.folders import STORE_MARKER, new_store, remove_stale_offload_stores

    killed = subprocess.run([sys.executable, "-c", "import os, sys; from a3q.layer_store.folders import new_store; "
                             "s = new_store(sys.argv[1]); (s / 'layer-00000.safetensors').write_bytes(b'x' * 64); "
                             "print(s, flush=True); os.kill(os.getpid(), 9)", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9
    stale = Path(killed.stdout.strip())
    elsewhere = new_store(tmp_path)  # made on another machine (a shared disk): the run lock says it is not in use
    (elsewhere / STORE_MARKER).write_text(json.dumps({"pid": 1, "start": 0, "host": "another-machine"}))
    live = new_store(tmp_path)  # this process's
    look_alike = tmp_path / f"{STORE_PREFIX}by-hand"
    look_alike.mkdir()
    (look_alike / "layer-00000.safetensors").write_bytes(b"mine")
    with_user_file = new_store(tmp_path)
    (with_user_file / STORE_MARKER).write_text(json.dumps({"pid": 1, "start": 0, "host": "another-machine"}))
    (with_user_file / "notes.txt").write_text("mine")
    outside = tmp_path / "outside"
    target = new_store(outside)
    (target / STORE_MARKER).write_text(json.dumps({"pid": 1, "start": 0, "host": "another-machine"}))
    link = tmp_path / f"{STORE_PREFIX}link"
    link.symlink_to(target, target_is_directory=True)
    linked_marker = new_store(tmp_path)
    (linked_marker / STORE_MARKER).unlink()
    (linked_marker / STORE_MARKER).symlink_to(elsewhere / STORE_MARKER)
    (tmp_path / f"{STORE_PREFIX}file").write_text("a file, not a store")

    removed = remove_stale_offload_stores(tmp_path)
    assert sorted(removed) == sorted([stale, elsewhere]) and not stale.exists() and not elsewhere.exists()
    for kept in (live, look_alike, with_user_file, link, target, linked_marker, tmp_path / f"{STORE_PREFIX}file"):
        assert kept.exists() or kept.is_symlink(), kept
    assert (look_alike / "layer-00000.safetensors").read_bytes() == b"mine"
    assert (with_user_file / "notes.txt").read_text() == "mine" and (target / STORE_MARKER).is_file()
    assert remove_stale_offload_stores(tmp_path) == [] and remove_stale_offload_stores(tmp_path / "none") == []


def test_smollm2_offloaded_to_disk_gives_the_in_memory_artifact(tmp_path, smollm2_path):
    """The real model end to end (A³ 20% + GPTQ on attention, evaluate, export): the same perplexity and the same
    artifact, with and without offload (the issue's bound is 1e-6 relative on logits; they are equal)."""
    from a3q.engine import run_recipe

    def run(offload: str):
        recipe = parse_recipe({
            "model": "smollm2-135m", "device": "cpu", "dtype": "float32", "offload": offload,
            "calibration": {"windows": 4, "seq_len": 128, "seed": 0},
            "stages": [{"stage": "a3", "allocation": "uniform", "ratio": 0.2},
                       {"stage": "gptq", "bits": 4, "group_size": 64, "skip_modules": ["mlp."]},
                       {"stage": "evaluate", "max_windows": 2, "seq_len": 256},
                       {"stage": "export", "path": str(tmp_path / offload / "artifact"), "max_shard_size": "100MB"}]})
        result = run_recipe(recipe, output_dir=tmp_path / offload, show_table=False)
        assert result.report.context["offload"] == offload
        return result.report.rows

    in_memory, offloaded = run("none"), run("disk")
    assert [row.get("ppl") for row in offloaded] == [row.get("ppl") for row in in_memory]
    assert not list((tmp_path / "disk").glob(".a3q-offload-*"))  # the store went with the run's model
    ids = torch.arange(100, 164).reshape(1, 64)
    logits = [load_graph(tmp_path / mode / "artifact").model(input_ids=ids).logits for mode in ("none", "disk")]
    assert torch.equal(*logits)
