"""Hostile checkpoints (issue 27, items 4, 5 and 6): an edited, truncated or resealed-but-inconsistent checkpoint, a
symbolic link or a user's file in ``OUT/checkpoint``: refused by name before any work, and nothing that a3q did not
write is followed, written or deleted.

One real checkpoint is made once for the module, through the engine (a tiny random Llama with SmolLM2's tokenizer, so
the recipe cuts real calibration windows): A³ is stage group 0, so the checkpoint holds its model (``model-00/``, a
sealed artifact); KV + GPTQ share the pass of group 1, stopped after layer 1 (``pass-01/``: two layer files and a
state file). Each test works on a copy.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from a3q.checkpoint.run import CheckpointRefused, RunCheckpoint
from a3q.checkpoint.stops import RunStopped, StopSignals, stop_points
from a3q.checkpoint.store import FORMAT_VERSION, CheckpointError
from a3q.engine import run_recipe
from a3q.io.manifest import SEAL_KEY, seal
from a3q.recipe import Recipe, parse_recipe
from tests.stop_at import SignalAt

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@dataclass
class Made:
    model: Path
    out: Path
    recipe: Recipe


@pytest.fixture(scope="module")
def made(tmp_path_factory, smollm2_path) -> Made:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hostile-checkpoints")
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).eval().save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    raw = {"model": str(root / "model"), "device": "cpu",
           "calibration": {"corpus": "enwiki", "split": "calib", "windows": 3, "seq_len": 32, "seed": 0},
           "stages": [{"stage": "a3", "allocation": "uniform", "ratio": 0.3, "batch_size": 2}, {"stage": "kv", "kv_ratio": 0.3, "batch_size": 2},
                      {"stage": "gptq", "bits": 4, "group_size": 16, "batch_size": 2}]}
    made = Made(root / "model", root / "out", parse_recipe(raw))
    with stop_points(SignalAt("group1.layer1:TERM")), pytest.raises(RunStopped):
        run_recipe(made.recipe, made.out, show_table=False)
    names = {p.relative_to(made.out / "checkpoint").as_posix() for p in (made.out / "checkpoint").rglob("*")}
    assert {"model-00/model.safetensors", "pass-01/layer-00001.safetensors", "pass-01/state-00002.safetensors"} <= names
    return made


@pytest.fixture()
def out(made, tmp_path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(made.out, copy, symlinks=True)
    return copy


def _open(made: Made, out: Path, resume: bool = True, restart: bool = False) -> RunCheckpoint:
    return RunCheckpoint.open(out, made.recipe, made.model, resume=resume, restart=restart, stops=StopSignals())


def _snapshot(folder: Path) -> dict[str, Any]:
    """Every entry below ``folder`` (links not followed): kind, size and modification time."""
    entries = {}
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(parent) / name
            info = os.lstat(path)
            entries[path.relative_to(folder).as_posix()] = (stat.S_IFMT(info.st_mode), info.st_size,
                                                            info.st_mtime_ns)
    return entries


def _edit(out: Path, change, reseal: bool = True) -> None:
    """Change the manifest; ``reseal``: as a3q would have written it (its seal and layout), so only the field checks
    can tell."""
    path = out / "checkpoint" / "checkpoint.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if reseal:
        manifest = seal({key: value for key, value in manifest.items() if key != SEAL_KEY})
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def _refused_before_any_work(made: Made, out: Path, match: str) -> str:
    """``--resume`` through the engine: one line naming the problem, nothing loaded or run (the report has no row,
    not even the load row), nothing in the checkpoint written or deleted."""
    before = _snapshot(out / "checkpoint")
    with pytest.raises(CheckpointError, match=match) as refused:
        run_recipe(made.recipe, out, show_table=False, resume=True)
    message = str(refused.value)
    assert "\n" not in message
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and report["stages"] == [] and report["failed"] == message
    assert _snapshot(out / "checkpoint") == before
    return message


def _first_module(manifest: dict) -> str:
    return next(iter(manifest["pass"]["layers"]["0"]["modules"]))


def _rename_a_stream(manifest: dict) -> None:
    hidden = manifest["pass"]["state"]["dict"]["hidden"]["dict"]
    hidden["stage7"] = hidden.pop(sorted(hidden)[0])


def _unknown_tensor(manifest: dict) -> None:
    hidden = manifest["pass"]["state"]["dict"]["hidden"]["dict"]
    hidden[sorted(hidden)[0]][0] = {"tensor": "state.not-in-the-file"}


#: (id, change, the field the refusal must name): every one resealed, so the seal cannot tell
INCONSISTENT = [
    ("next_layer 999", lambda m: m["pass"].update(next_layer=999), r"field 'pass\.next_layer' is 999; the model has 4"),
    ("completed_groups 5", lambda m: m.update(completed_groups=5), r"field 'completed_groups' is 5: the recipe has 2"),
    ("qk_head_dims 1e6", lambda m: m["pass"]["config"].update(qk_head_dims=[1e6] * 4),
     r"field 'pass\.config\.qk_head_dims\[0\]' is 1000000\.0, not a size in \[1, 16\]"),
    ("recipe missing", lambda m: m.pop("recipe"), r"field 'recipe' is missing"),
    ("report_rows a string", lambda m: m.update(report_rows="abc"), r"field 'report_rows' is \"abc\", not a list"),
    ("report_rows of numbers", lambda m: m.update(report_rows=[1, 2]), r"field 'report_rows\[0\]' is 1, not a report"),
    ("report row seconds a string", lambda m: m["report_rows"][1].update(seconds="slow"),
     r"field 'report_rows\[1\]\.seconds' is \"slow\", not a number"),
    ("report rows of other stages", lambda m: m["report_rows"].pop(1), r"field 'report_rows' name the stages"),
    ("history of other stages", lambda m: m["history"][-1].update(stage="gptq"), r"field 'history' does not end"),
    ("history entry not a dict", lambda m: m["history"].append(3), r"field 'history\[1\]' is 3"),
    ("pass of another group", lambda m: m["pass"].update(group=0), r"field 'pass\.group' is 0"),
    ("a finished layer dropped", lambda m: m["pass"]["layers"].pop("1"), r"field 'pass\.layers' name layers"),
    ("state file of another layer", lambda m: m["pass"].update(state_file="pass-01/state-00001.safetensors"),
     r"field 'pass\.state_file'"),
    ("no model folder", lambda m: m.update(model_folder=None), r"field 'model_folder' is null"),
    ("model folder outside", lambda m: m.update(model_folder="../../victim"), r"field 'model_folder'"),
    ("model dtype", lambda m: m.update(model_dtype="int8"), r"field 'model_dtype' is \"int8\""),
    ("odd q/k dim with RoPE pairs", lambda m: m["pass"]["config"]["qk_head_dims"].__setitem__(0, 9),
     r"field 'pass\.config\.qk_head_dims\[0\]' is 9, not even"),
    ("RoPE pair out of range", lambda m: m["pass"]["config"]["rope_pairs"][0][0].__setitem__(0, 99),
     r"field 'pass\.config\.rope_pairs\[0\]' holds"),
    ("per-layer list too short", lambda m: m["pass"]["config"].update(intermediate_sizes=[56]),
     r"field 'pass\.config\.intermediate_sizes' is \[56\], not one entry per layer"),
    ("a stream the stages do not have", _rename_a_stream, r"field 'pass\.state\.hidden' holds the streams"),
    ("an unknown module class", lambda m: m["pass"]["layers"]["0"]["modules"][_first_module(m)].update(
        **{"class": "Pickle"}), r"field 'pass\.layers\.0\.modules\..*\.class' is \"Pickle\""),
    ("a module size beyond the model", lambda m: m["pass"]["layers"]["0"]["modules"][_first_module(m)]["args"].update(
        in_features=10**9), r"field 'pass\.layers\.0\.modules\..*\.args\.in_features' is 1000000000"),
    ("a file outside the pass", lambda m: m["files"].update({"pass-01/layer-00007.safetensors": m["files"][
        "pass-01/layer-00000.safetensors"]}), r"field 'files' lists 'pass-01/layer-00007\.safetensors'"),
    ("a file name outside the folder", lambda m: m["files"].update({"../victim": {"bytes": 0, "sha256": "0" * 64}}),
     r"field 'files' file name \"\.\./victim\" is not one a3q writes"),
    ("a tensor the state file lacks", _unknown_tensor, r"field 'pass\.state' names tensor 'state\.not-in-the-file'"),
    ("a model fingerprint that is no hash", lambda m: m.update(model_fingerprint="x"),
     r"field 'model_fingerprint' is not a SHA-256"),
]


#: the cases of the issue, through the whole engine; the others through RunCheckpoint.open, which the engine calls
THROUGH_THE_ENGINE = {"next_layer 999", "completed_groups 5", "qk_head_dims 1e6", "recipe missing",
                      "report_rows a string"}


@pytest.mark.parametrize(("name", "change", "match"), INCONSISTENT, ids=[case[0] for case in INCONSISTENT])
def test_a_resealed_but_inconsistent_checkpoint_is_refused_by_field_before_any_work(made, out, name, change, match):
    _edit(out, change)
    if name in THROUGH_THE_ENGINE:
        message = _refused_before_any_work(made, out, match)
    else:
        before = _snapshot(out / "checkpoint")
        with pytest.raises(CheckpointError, match=match) as refused:
            _open(made, out)
        message = str(refused.value)
        assert "\n" not in message and _snapshot(out / "checkpoint") == before
    assert f"'{out / 'checkpoint' / 'checkpoint.json'}': field '" in message and "--restart" in message


def test_an_edited_manifest_is_refused_by_its_seal_and_by_its_bytes(made, out):
    _edit(out, lambda m: m["pass"].update(next_layer=999), reseal=False)  # the hand edit
    _refused_before_any_work(made, out, r"checkpoint\.json': edited after it was written \(its manifest_sha256")
    shutil.rmtree(out)
    shutil.copytree(made.out, out)
    path = out / "checkpoint" / "checkpoint.json"
    path.write_text(json.dumps(json.loads(path.read_text())) + "\n")  # the same content, other spacing
    _refused_before_any_work(made, out, r"checkpoint\.json': edited after it was written \(its bytes")


def test_an_older_checkpoint_format_is_refused_with_what_to_do(made, out):
    _edit(out, lambda m: m.update(format=FORMAT_VERSION - 1))
    _refused_before_any_work(made, out, rf"written by an older a3q \(checkpoint format {FORMAT_VERSION - 1}: sizes "
                                        rf"only, unsealed\); this a3q reads checkpoint format {FORMAT_VERSION}: start "
                                        "over with --restart")


def test_a_sealed_checkpoint_resumes_and_a_pass_file_that_cannot_be_restored_is_named(made, out):
    _open(made, out)  # the untouched copy passes every check
    # sealed and consistent, but the layer file's module arguments do not fit its tensors: refused when restored,
    # still before any layer is processed, naming the file
    _edit(out, lambda m: m["pass"]["layers"]["0"]["modules"][_first_module(m)]["args"].update(in_features=8))
    before = _snapshot(out / "checkpoint")
    with pytest.raises(CheckpointError, match=r"pass-01/layer-00000\.safetensors' cannot be restored as layer 0"):
        run_recipe(made.recipe, out, show_table=False, resume=True)
    assert json.loads((out / "report.json").read_text())["status"] == "failed"
    assert _snapshot(out / "checkpoint") == before  # no layer processed: none checkpointed


# -- any byte, any file ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(made, tmp_path_factory) -> Path:
    """A copy the hypothesis test changes in place, one file at a time, and puts back."""
    copy = tmp_path_factory.mktemp("pristine") / "out"
    shutil.copytree(made.out, copy)
    return copy


@FAST
@given(data=st.data())
def test_any_byte_change_or_truncation_in_any_checkpoint_file_is_refused_naming_the_file(made, pristine, data):
    root = pristine / "checkpoint"
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.stat().st_size)  # the marker is empty
    path = data.draw(st.sampled_from(files), label="file")
    original = path.read_bytes()
    if data.draw(st.booleans(), label="truncate"):
        changed = original[:data.draw(st.integers(0, len(original) - 1), label="keep")]
    else:
        at = data.draw(st.integers(0, len(original) - 1), label="at")
        flipped = original[at] ^ data.draw(st.integers(1, 255), label="xor")
        changed = original[:at] + bytes([flipped]) + original[at + 1:]
    path.write_bytes(changed)
    try:
        with pytest.raises(CheckpointError) as refused:
            _open(made, pristine)
        assert f"'{path}'" in str(refused.value)
    finally:
        path.write_bytes(original)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10)
FIELDS = [("format",), ("recipe",), ("files",), ("completed_groups",), ("report_rows",), ("history",),
          ("model_folder",), ("model_dtype",), ("pass",), ("complete",), ("pass", "group"), ("pass", "next_layer"),
          ("pass", "layers"), ("pass", "state_file"), ("pass", "windows_sha256"), ("pass", "dtype"), ("pass", "state"),
          ("pass", "config"), ("pass", "config", "qk_head_dims"), ("pass", "config", "rope_pairs"),
          ("pass", "config", "intermediate_sizes"), ("pass", "layers", "0"), ("pass", "layers", "0", "modules"),
          ("pass", "layers", "0", "modules", "*", "class"), ("pass", "layers", "0", "modules", "*", "args"),
          ("pass", "state", "dict", "stages"), ("pass", "state", "dict", "hidden"), ("pass", "state", "dict", "rng"),
          ("report_rows", 1), ("history", 0), ("files", "pass-01/state-00002.safetensors")]


@settings(FAST, max_examples=100)
@given(field=st.sampled_from(FIELDS), value=json_values, remove=st.booleans())
def test_any_value_in_any_field_of_a_resealed_manifest_is_refused_as_a_checkpoint_error(made, pristine, field,
                                                                                         value, remove):
    path = pristine / "checkpoint" / "checkpoint.json"
    original = path.read_bytes()

    def change(manifest):
        *parents, last = field
        target = manifest
        for key in parents:  # "*": the first key there (a swapped module's path)
            target = target[next(iter(target)) if key == "*" else key]
        if remove and isinstance(target, dict):
            target.pop(last)
        else:
            target[last] = value

    _edit(pristine, change)
    try:
        _open(made, pristine)  # refused as CheckpointError / CheckpointRefused, or (a harmless value) accepted
    except (CheckpointError, CheckpointRefused) as exc:
        assert "\n" not in str(exc)
    finally:
        path.write_bytes(original)


# -- links and files a3q did not write ---------------------------------------------------------------------------
def _outside(tmp_path: Path, source: Path) -> Path:
    """A folder outside the checkpoint holding a copy of ``source`` plus a file of the user's."""
    outside = tmp_path / "outside"
    shutil.copytree(source, outside) if source.is_dir() else (outside.mkdir(), shutil.copy(source, outside))
    (outside / "keep.txt").write_text("the user's")
    return outside


@pytest.mark.parametrize("name", ["pass-01", "model-00", "checkpoint.json", ".a3q-checkpoint",
                                  "pass-01/state-00002.safetensors", "model-00/config.json", "."])
def test_a_symlink_in_the_checkpoint_is_never_followed(made, out, tmp_path, name):
    """Resume, restart and a fresh run all refuse, naming the link; the folder it points to stays as it was."""
    root = out / "checkpoint"
    link = root / name if name != "." else root
    outside = _outside(tmp_path, link)
    target = outside if link.is_dir() else outside / link.name
    shutil.rmtree(link) if link.is_dir() else link.unlink()
    link.symlink_to(target, target_is_directory=target.is_dir())
    before = _snapshot(outside)
    for resume, restart in ((True, False), (False, True), (False, False)):
        with pytest.raises(CheckpointError, match=rf"'{link}' is a symbolic link, which a3q did not write"):
            _open(made, out, resume=resume, restart=restart)
    _refused_before_any_work(made, out, r"is a symbolic link")
    assert _snapshot(outside) == before and link.is_symlink()


@pytest.mark.parametrize("where", [".", "pass-01", "model-00", "model-00/sub"])
def test_a_user_file_in_the_checkpoint_is_named_and_left_and_restart_refuses(made, out, where):
    root = out / "checkpoint"
    (root / where).mkdir(exist_ok=True)
    notes = root / where / "notes.txt"
    notes.write_text("mine")
    before = _snapshot(root)
    for resume, restart in ((False, True), (True, False)):
        with pytest.raises(CheckpointError, match=rf"'{notes}' is not .*move it out of '{root}'"):
            _open(made, out, resume=resume, restart=restart)
    assert _snapshot(root) == before
    notes.unlink()  # moved away: --restart now removes the checkpoint, and only a3q's files were there
    if where == "model-00/sub":
        (root / where).rmdir()
    _open(made, out, resume=False, restart=True)
    assert not root.exists()


def test_restart_removes_only_what_a3q_wrote_including_leftovers_of_a_kill(made, out):
    """Files a kill leaves (a temporary layer file, an unlisted state file, a staging folder, the manifest's
    temporary) are a3q's names: removed with the rest; the output folder's other files stay."""
    root = out / "checkpoint"
    (root / "pass-01" / ".layer-00002.safetensors.tmp").write_bytes(b"partial")
    (root / "pass-01" / "state-00003.safetensors").write_bytes(b"unlisted")
    (root / ".checkpoint.json.abc123").write_text("{")
    staging = root / ".model-01.tmp-abc123"
    staging.mkdir()
    (staging / ".a3q-staging").touch()
    (out / "mine.txt").write_text("beside the checkpoint")
    _open(made, out, resume=False, restart=True)
    assert not root.exists() and (out / "mine.txt").read_text() == "beside the checkpoint"


def test_a_staging_look_alike_without_the_marker_is_refused(made, out):
    fake = out / "checkpoint" / ".model-01.tmp-abc123"
    fake.mkdir()
    (fake / "data").write_text("mine")
    with pytest.raises(CheckpointError, match=rf"'{fake}' is not a file or folder a3q writes"):
        _open(made, out, resume=False, restart=True)
    assert (fake / "data").read_text() == "mine"
