"""Artifacts: export → load gives identical logits; writes are atomic and never clobber foreign data."""

from __future__ import annotations

import json

import pytest
import torch

import a3q
from a3q.io.artifact import ArtifactExistsError, save_artifact


def test_dense_export_reloads_with_identical_logits(smollm2, tmp_path):
    path = save_artifact(smollm2, tmp_path / "dense", recipe={"model": "smollm2-135m"}, report=[{"stage": "load"}])
    manifest = json.loads((path / "a3q.json").read_text())
    assert manifest["recipe"] == {"model": "smollm2-135m"}
    assert manifest["structure"]["family"] == "llama"
    assert len(manifest["structure"]["layers"]) == 30
    assert "model.safetensors" in manifest["files"] and len(manifest["files"]["model.safetensors"]["sha256"]) == 64
    assert not list(tmp_path.glob(".dense*")), "staging folder left behind"

    reloaded = a3q.load(str(path))
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 2]])
    with torch.no_grad():
        expected = smollm2.model(input_ids=ids).logits
        actual = reloaded.model(input_ids=ids).logits
    assert torch.equal(expected, actual)
    assert reloaded.decoder_linear_params() == smollm2.decoder_linear_params()


def test_reexport_replaces_artifact_but_foreign_folder_is_refused(smollm2, tmp_path):
    target = save_artifact(smollm2, tmp_path / "art", recipe={"v": 1}, report=[])
    (target / "README.md").write_text("model card")  # sharing adds one; it does not make the folder foreign
    save_artifact(smollm2, target, recipe={"v": 2}, report=[])
    assert json.loads((target / "a3q.json").read_text())["recipe"] == {"v": 2}
    assert not (target / "README.md").exists()

    forged = tmp_path / "forged"  # an a3q.json alone does not make a folder ours: its files must all be listed
    forged.mkdir()
    (forged / "a3q.json").write_text('{"files": {}}')
    (forged / "thesis.tex").write_text("years of work")
    with pytest.raises(ArtifactExistsError, match="did not export"):
        save_artifact(smollm2, forged, recipe=None, report=[])
    assert (forged / "thesis.tex").read_text() == "years of work"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactExistsError):
        save_artifact(smollm2, foreign, recipe=None, report=[])
    assert (foreign / "notes.txt").read_text() == "mine"


def test_failed_write_leaves_previous_artifact_intact(smollm2, tmp_path, monkeypatch):
    target = save_artifact(smollm2, tmp_path / "art", recipe={"v": 1}, report=[])
    before = (target / "a3q.json").read_text()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(smollm2.tokenizer), "save_pretrained", explode)
    with pytest.raises(OSError, match="disk full"):
        save_artifact(smollm2, target, recipe={"v": 2}, report=[])
    assert (target / "a3q.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
