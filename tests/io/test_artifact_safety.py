"""Writing artifacts never loses a user's data; loading refuses anything that does not match its manifest.

Reproducers of what a hostile probe found (issue 16), on the real SmolLM2: an export path with ``..`` that deleted a
folder, leftover staging folders, racing writers, 0700 artifacts, a full disk, and artifacts that were truncated,
edited or extended after export.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

import a3q
from a3q.io.artifact import ArtifactExistsError, save_artifact
from a3q.atomic import STAGING_MARKER, TargetBusyError, target_lock
from a3q.io.manifest import ArtifactError, verify_artifact
from a3q.recipe import RecipeError, parse_recipe


@pytest.fixture(scope="module")
def artifact(smollm2, tmp_path_factory) -> Path:
    """One dense SmolLM2 artifact; tests tamper with copies of it."""
    return save_artifact(smollm2, tmp_path_factory.mktemp("art") / "dense", recipe={"model": "smollm2-135m"}, report=[])


def _copy(artifact: Path, target: Path, tampered: str | None = None) -> Path:
    """A copy of ``artifact``; every file but ``tampered`` is a hard link (the big weights cost nothing)."""
    for source in artifact.rglob("*"):
        destination = target / source.relative_to(artifact)
        if source.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.relative_to(artifact).as_posix() == tampered:
            shutil.copyfile(source, destination)
        else:
            os.link(source, destination)
    return target


def test_export_path_through_dotdot_is_refused_and_the_folder_survives(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "v").mkdir(parents=True)
    (tmp_path / "out" / "v" / "data.csv").write_text("1,2,3")
    raw = {"model": "smollm2-135m", "stages": [{"stage": "export", "path": "out/nope/../v"}]}
    with pytest.raises(RecipeError) as caught:
        parse_recipe(raw)
    assert caught.value.problems[0].startswith("stages[0] (export): path:")
    assert "not an a3q artifact" in caught.value.problems[0]
    assert (tmp_path / "out" / "v" / "data.csv").read_text() == "1,2,3"


def test_export_through_dotdot_writes_the_resolved_folder(smollm2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = save_artifact(smollm2, "out/missing/../art", recipe=None, report=[])
    assert path == (tmp_path / "out" / "art").resolve()
    verify_artifact(path)
    with pytest.raises(ArtifactExistsError):  # checked again at write time, on the resolved path
        (tmp_path / "out" / "mine").mkdir()
        (tmp_path / "out" / "mine" / "x").write_text("x")
        save_artifact(smollm2, "out/missing/../mine", recipe=None, report=[])
    assert (tmp_path / "out" / "mine" / "x").read_text() == "x"


def test_a_second_writer_fails_clearly_while_the_first_holds_the_target(smollm2, tmp_path):
    target = (tmp_path / "art").resolve()
    with target_lock(target):
        with pytest.raises(TargetBusyError, match="another a3q process"):
            save_artifact(smollm2, target, recipe=None, report=[])
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "lock or staging files left behind"


def test_staging_left_by_a_killed_run_is_removed_but_unmarked_folders_are_not(smollm2, tmp_path):
    killed = tmp_path / ".art.tmp-abc123"
    killed.mkdir()
    (killed / STAGING_MARKER).touch()
    (killed / "model.safetensors").write_bytes(b"\0" * 1024)
    lookalike = tmp_path / ".art.tmp-user"  # same name pattern, but not a3q's: kept
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("keep")
    save_artifact(smollm2, tmp_path / "art", recipe=None, report=[])
    assert not killed.exists()
    assert (lookalike / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.tmp-user", "art"]


def test_artifact_files_follow_the_umask(artifact, smollm2, tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_artifact(smollm2, tmp_path / "art", recipe=None, report=[])
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    for name in ("model.safetensors", "a3q.json", "config.json"):
        assert stat.S_IMODE((path / name).stat().st_mode) == 0o644, name


def test_full_disk_keeps_the_previous_artifact_and_says_so(artifact, smollm2, tmp_path, monkeypatch):
    target = _copy(artifact, tmp_path / "art")
    before = (target / "a3q.json").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(smollm2.tokenizer), "save_pretrained", disk_full)
    with pytest.raises(OSError, match="disk full") as caught:
        save_artifact(smollm2, target, recipe={"v": 2}, report=[])
    assert caught.value.errno == errno.ENOSPC and "bytes" in str(caught.value)
    assert (target / "a3q.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_the_weights_is_refused_by_name(artifact, tmp_path):
    copy = _copy(artifact, tmp_path / "art", tampered="model.safetensors")
    _flip_byte(copy / "model.safetensors", (copy / "model.safetensors").stat().st_size // 2)
    with pytest.raises(ArtifactError, match=r"model\.safetensors: content differs"):
        a3q.load(str(copy))
    assert a3q.load(str(copy), verify=False).decoder_linear_params() > 0  # the switch, for speed


@pytest.mark.parametrize(
    "tamper, message",
    [
        ("truncate", r"model\.safetensors: truncated"),
        ("delete", r"tokenizer\.json: listed in the manifest but missing"),
        ("add_code", r"evil\.py: not listed in the manifest"),
        ("edit_manifest", r"a3q\.json: edited after export"),
        ("edit_config", r"config\.json: content differs"),
    ],
)
def test_tampered_artifacts_are_refused_with_the_file_named(artifact, tmp_path, tamper, message):
    tampered = {"truncate": "model.safetensors", "edit_manifest": "a3q.json", "edit_config": "config.json"}.get(tamper)
    copy = _copy(artifact, tmp_path / "art", tampered=tampered)
    if tamper == "truncate":
        with open(copy / "model.safetensors", "r+b") as handle:
            handle.truncate((copy / "model.safetensors").stat().st_size - 4096)
    elif tamper == "delete":
        (copy / "tokenizer.json").unlink()
    elif tamper == "add_code":
        (copy / "evil.py").write_text("import os\n")
    elif tamper == "edit_manifest":  # e.g. turn on a quantized KV cache the run never measured
        manifest = json.loads((copy / "a3q.json").read_text())
        manifest["structure"]["kv_cache"] = {"bits": 4, "group_size": 32, "residual": 0, "key_axis": "channel"}
        (copy / "a3q.json").write_text(json.dumps(manifest))
    elif tamper == "edit_config":
        text = (copy / "config.json").read_text()  # same length: only the hash can tell
        assert '"num_hidden_layers": 30' in text
        (copy / "config.json").write_text(text.replace('"num_hidden_layers": 30', '"num_hidden_layers": 10'))
    with pytest.raises(ArtifactError, match=message):
        a3q.load(str(copy))
    if tamper != "edit_config":  # presence, sizes and the seal are checked at validation too (hashes at load)
        with pytest.raises(RecipeError, match=message.split(":")[0]):
            parse_recipe({"model": str(copy), "stages": [{"stage": "evaluate", "max_windows": 1}]})


def test_an_a3q_folder_without_its_manifest_is_refused(smollm2, tmp_path):
    from a3q.stages.a3.apply import as_a3_graph

    path = save_artifact(as_a3_graph(smollm2), tmp_path / "a3", recipe=None, report=[])
    (path / "a3q.json").unlink()
    with pytest.raises(ArtifactError, match=r"a3q\.json: missing, but config\.json says a3q wrote"):
        a3q.load(str(path))
