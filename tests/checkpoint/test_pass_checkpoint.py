"""Pass checkpoints on tiny random models (mechanics only): stop, resume, disk full, refusals, state round trips.

The real-model, real-process test is :mod:`tests.checkpoint.test_resume`.
"""

from __future__ import annotations

import errno
import json

import pytest
import torch

from a3q.arch import describe
from a3q.checkpoint.run import CheckpointRefused, RunCheckpoint
from a3q.checkpoint.state import join_tensors, rng_state, set_rng_state, split_tensors
from a3q.checkpoint.stops import RunStopped, StopSignals
from a3q.checkpoint.store import CheckpointError
from a3q.io.manifest import SEAL_KEY, seal
from a3q.pipeline.runner import run_pipeline
from a3q.recipe import parse_recipe
from a3q.registry import build_stages
from tests.stages.a3.test_pipeline_tiny import tiny_llama
from tests.stop_at import SignalAt

WINDOWS = torch.randint(0, 96, (6, 24), generator=torch.Generator().manual_seed(1))
STAGE_LISTS = {
    "a3+gptq": [{"stage": "a3", "allocation": "uniform", "ratio": 0.3}, {"stage": "gptq", "bits": 4, "group_size": 16}],
    "a3-global": [{"stage": "a3", "ratio": 0.3, "allocation": "global", "probe_windows": 2, "probe_seq_len": 16}],
    "svd_llm": [{"stage": "svd_llm", "ratio": 0.3}],
    "kv-ranks": [{"stage": "kv", "kv_ratio": 0.3}],
    # a planner, a dense and a sequential stream: two streams hold the same tensors when the plan is saved
    "a3-global+kv+gptq": [STAGE_A3_GLOBAL := {"stage": "a3", "ratio": 0.3, "allocation": "global", "probe_windows": 2,
                                               "probe_seq_len": 16, "components": ["mlp"]},
                          {"stage": "kv", "kv_ratio": 0.3}, {"stage": "gptq", "bits": 4, "group_size": 16}],
    # a planner and a sequential stream in one pass, as the engine groups them
    "a3-global+gptq": [STAGE_A3_GLOBAL, {"stage": "gptq", "bits": 4, "group_size": 16}],
}
#: the lists the engine runs as ONE pass (a3-global+kv+gptq is two: KV resizes layers after A³ did); a checkpoint of
#: one pass over all of that list's stages is not one the engine writes, and resuming it is refused
ONE_PASS = [name for name in STAGE_LISTS if name != "a3-global+kv+gptq"]


def _model():
    model = tiny_llama()
    model.config.num_hidden_layers = 4
    torch.manual_seed(0)
    return type(model)(model.config).eval()


@pytest.fixture()
def model_folder(tmp_path):
    folder = tmp_path / "model"
    _model().save_pretrained(folder)
    return folder


def _recipe(folder, stages, **header):
    return parse_recipe({"model": str(folder), "stages": stages, **header}, check_model=False)


def _run(recipe, folder, out, resume=False, restart=False, stop_at=None):
    """One pass of ``recipe``'s stages over WINDOWS with checkpoints in ``out`` (as the engine runs a group);
    ``stop_at``: where a signal stops it (:class:`tests.stop_at.SignalAt`)."""
    graph = describe(_model(), tokenizer=None, source="tiny")
    with StopSignals(points=SignalAt(stop_at) if stop_at else None) as stops:
        checkpoint = RunCheckpoint.open(out, recipe, folder, resume=resume, restart=restart, stops=stops)
        workers = build_stages(recipe)
        graph = run_pipeline(graph, WINDOWS, workers, progress=False,
                             checkpoint=checkpoint.pass_checkpoint(0, "test pass"))
    return graph, workers


def _same_model(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].dtype == sb[k].dtype and sa[k].equal(sb[k]) for k in sa), [k for k in sa if not sa[k].equal(sb[k])]
    assert a.model.config.to_dict() == b.model.config.to_dict()


@pytest.mark.parametrize(("name", "stop_at"), [(name, ("group0.layer1:TERM", "group0.layer2:INT")[position % 2])
                                               for position, name in enumerate(ONE_PASS)])
def test_a_stopped_pass_resumes_to_the_uninterrupted_result(tmp_path, model_folder, name, stop_at):
    recipe = _recipe(model_folder, STAGE_LISTS[name])
    expected, expected_workers = _run(recipe, model_folder, tmp_path / "reference")
    with pytest.raises(RunStopped, match=r"stopped by SIG(TERM|INT) after layer \d of test pass; checkpoint in"):
        _run(recipe, model_folder, tmp_path / "out", stop_at=stop_at)
    resumed, workers = _run(recipe, model_folder, tmp_path / "out", resume=True)
    _same_model(expected, resumed)
    for a, b in zip(expected_workers, workers):
        assert json.dumps(a.metrics, default=str) == json.dumps(b.metrics, default=str)


def test_a_planning_stage_resumes_after_its_plan_without_planning_again(tmp_path, model_folder, monkeypatch):
    recipe = _recipe(model_folder, STAGE_LISTS["a3-global"], checkpoint_every=100)
    expected, _ = _run(recipe, model_folder, tmp_path / "reference")
    with pytest.raises(RunStopped, match="after planning"):
        _run(recipe, model_folder, tmp_path / "out", stop_at="group0.plan:TERM")
    planned = []
    monkeypatch.setattr("a3q.stages.a3.stage.plan_global_ranks", lambda *a, **k: planned.append(1))
    resumed, _ = _run(recipe, model_folder, tmp_path / "out", resume=True)
    assert not planned
    _same_model(expected, resumed)


def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path, model_folder,
                                                                                 monkeypatch):
    import safetensors.torch

    recipe = _recipe(model_folder, STAGE_LISTS["a3+gptq"])
    expected, _ = _run(recipe, model_folder, tmp_path / "reference")
    real_save, calls = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if "state-00003" in filename:  # the state after layer 2: a partial write, then the disk is full
            open(filename, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(CheckpointError, match=r"disk full .*state-00003.*needs about [\d,]+ bytes.*previous checkpoint is intact"):
        _run(recipe, model_folder, tmp_path / "out")
    root = tmp_path / "out" / "checkpoint"
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert json.loads((root / "checkpoint.json").read_text())["pass"]["next_layer"] == 2
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    resumed, _ = _run(recipe, model_folder, tmp_path / "out", resume=True)
    _same_model(expected, resumed)


def test_the_checkpoint_is_refused_for_another_recipe_or_model_and_never_overwritten(tmp_path, model_folder):
    recipe = _recipe(model_folder, STAGE_LISTS["a3+gptq"])
    out = tmp_path / "out"
    with pytest.raises(CheckpointRefused, match="no checkpoint"):
        RunCheckpoint.open(out, recipe, model_folder, resume=True, restart=False, stops=StopSignals())
    with pytest.raises(RunStopped):
        _run(recipe, model_folder, out, stop_at="group0.layer1:TERM")
    with pytest.raises(CheckpointRefused, match=r"unfinished run \(after layer 1 of test pass\): --resume"):
        RunCheckpoint.open(out, recipe, model_folder, resume=False, restart=False, stops=StopSignals())
    changed = _recipe(model_folder, [{"stage": "a3", "allocation": "uniform", "ratio": 0.2}, STAGE_LISTS["a3+gptq"][1]])
    with pytest.raises(CheckpointRefused, match=r"recipe differs.*stages\[0\]: .*0\.3.* → .*0\.2"):
        RunCheckpoint.open(out, changed, model_folder, resume=True, restart=False, stops=StopSignals())
    cadence = _recipe(model_folder, STAGE_LISTS["a3+gptq"], checkpoint_every=5, output="elsewhere")
    RunCheckpoint.open(out, cadence, model_folder, resume=True, restart=False, stops=StopSignals())  # allowed
    other = tmp_path / "other"
    model = _model()
    model.config.rms_norm_eps = 1e-5
    model.save_pretrained(other)
    with pytest.raises(CheckpointRefused, match="is not the model the checkpoint was made from"):
        RunCheckpoint.open(out, recipe, other, resume=True, restart=False, stops=StopSignals())
    RunCheckpoint.open(out, recipe, model_folder, resume=False, restart=True, stops=StopSignals())
    assert not (out / "checkpoint").exists()  # --restart discarded it
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "precious.txt").write_text("not a3q's")
    with pytest.raises(CheckpointError, match="not made by a3q"):
        RunCheckpoint.open(out, recipe, model_folder, resume=False, restart=True, stops=StopSignals())
    assert (out / "checkpoint" / "precious.txt").read_text() == "not a3q's"


def test_an_export_into_the_checkpoint_folder_is_refused_before_loading(tmp_path, model_folder):
    from a3q.checks import check_run

    out = tmp_path / "out"
    for path in (out / "checkpoint", out / "checkpoint" / "final"):
        recipe = _recipe(model_folder, [{"stage": "export", "path": str(path)}])
        assert any("which the run replaces and removes" in p for p in check_run(recipe, out))


def test_state_splits_into_json_and_tensors_and_back():
    state = {"a": [1, 2.5, None, "x", torch.arange(3)], "b": {"c": torch.ones(2, dtype=torch.float64)}}
    tensors = {}
    plain = split_tensors(state, tensors)
    json.dumps(plain)
    back = join_tensors(json.loads(json.dumps(plain)), tensors)
    assert back["a"][:4] == [1, 2.5, None, "x"] and back["a"][4].equal(torch.arange(3))
    assert back["b"]["c"].dtype == torch.float64
    shared = torch.arange(4.0)
    tensors = {}
    plain = split_tensors({"a": [shared], "b": [shared], "view": shared[:2]}, tensors)
    assert plain["dict"]["a"] == plain["dict"]["b"] and len(tensors) == 2  # stored once; the view copied
    with pytest.raises(TypeError, match="string keys"):
        split_tensors({1: 2}, {})
    with pytest.raises(TypeError, match="cannot go into a checkpoint"):
        split_tensors({"x": object()}, {})


def test_rng_states_round_trip_through_json_and_tensors():
    import random

    import numpy as np

    tensors = {}
    saved = json.loads(json.dumps(split_tensors(rng_state(), tensors)))
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(join_tensors(saved, tensors))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_a_manifest_can_name_only_files_a3q_writes(tmp_path, model_folder):
    """A crafted checkpoint.json must not make a resume read, replace or delete anything outside the folder."""
    recipe = _recipe(model_folder, STAGE_LISTS["a3+gptq"])
    out = tmp_path / "out"
    with pytest.raises(RunStopped):
        _run(recipe, model_folder, out, stop_at="group0.layer1:TERM")
    path = out / "checkpoint" / "checkpoint.json"
    saved = path.read_text()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "x").write_text("the user's")

    def write(manifest):  # resealed, as a3q writes it: only the checks of the names and fields can tell
        body = {key: value for key, value in manifest.items() if key != SEAL_KEY}
        path.write_text(json.dumps(seal(body), indent=2) + "\n")

    outside_state = {**json.loads(saved)["pass"], "state_file": "../../victim/x"}
    for crafted, field in (({**json.loads(saved), "model_folder": "../../victim"}, "model_folder"),
                           ({**json.loads(saved), "pass": outside_state}, "pass.state_file"),
                           ({**json.loads(saved), "files": {"../../victim/x": {"bytes": 10, "sha256": "0" * 64}}},
                            "files")):
        write(crafted)
        with pytest.raises(CheckpointError, match=rf"field '{field}'"):
            RunCheckpoint.open(out, recipe, model_folder, resume=True, restart=False, stops=StopSignals())
    assert (victim / "x").read_text() == "the user's"
    crafted = json.loads(saved)
    crafted["pass"]["state"]["dict"]["stages"][1]["dict"]["config"] = {"dict": {}}  # not a checkpointed attribute
    write(crafted)
    with pytest.raises(CheckpointError, match=r"state-00002\.safetensors' cannot be restored as the pass's state "
                                              r"\(gptq: checkpoint state names unknown attributes \['config'\]\)"):
        _run(recipe, model_folder, out, resume=True)
