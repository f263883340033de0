"""Hub ids (``org/name``) resolved offline from a Hugging Face cache layout built in a temporary HF_HOME."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from a3q.assets.models import HubModelError, looks_like_hub_id, resolve_hub_model
from a3q.io.model_folder import check_model_reference
from a3q.recipe import RecipeError, parse_recipe

REPO = "a3q-test/smollm2-mirror"
REV = "0123456789abcdef0123456789abcdef01234567"
WANTED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture
def hub_home(tmp_path, monkeypatch, smollm2_path):
    """``$HF_HOME/hub/models--a3q-test--smollm2-mirror`` with SmolLM2's files at ``REV`` = refs/main, laid out as the
    Hub cache does: the files in ``blobs/`` (hard links here), the snapshot's names symlinks into them."""
    storage = tmp_path / "hub" / ("models--" + REPO.replace("/", "--"))
    snapshot, blobs = storage / "snapshots" / REV, storage / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for name in WANTED:
        if (Path(smollm2_path) / name).is_file():
            try:
                os.link(Path(smollm2_path) / name, blobs / name)
            except OSError:  # another file system
                shutil.copyfile(Path(smollm2_path) / name, blobs / name)
            (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / name)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(REV)
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_hub_id("HuggingFaceTB/SmolLM2-135M")
    assert not looks_like_hub_id("smollm2-135m")  # an alias
    assert not looks_like_hub_id("/abs/path") and not looks_like_hub_id("a/b/c") and not looks_like_hub_id("../x")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not looks_like_hub_id("org/name")  # an existing folder stays a folder


def test_a_cached_hub_id_resolves_to_its_snapshot_and_validates(hub_home):
    assert resolve_hub_model(REPO) == hub_home
    assert resolve_hub_model(REPO, REV) == hub_home
    assert check_model_reference(REPO) is None
    recipe = parse_recipe({"model": REPO, "stages": [{"stage": "evaluate"}]})
    assert recipe.model == REPO and recipe.revision is None


def test_a_cached_hub_id_loads(hub_home):
    from a3q.io.loading import load_graph

    graph = load_graph(REPO, "auto", device="auto")
    assert graph.source == REPO and len(graph.layers) == 30
    assert next(graph.model.parameters()).dtype.is_floating_point


def test_an_unknown_id_offline_names_it_and_what_to_do(hub_home):
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"model": "nobody/nothing", "stages": [{"stage": "evaluate"}]})
    message = str(caught.value)
    assert "model: 'nobody/nothing'" in message and "huggingface-cli download nobody/nothing" in message
    assert "HF_HOME" in message and "local folder" in message


def test_a_missing_revision_is_named(hub_home):
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"model": REPO, "revision": "v9", "stages": [{"stage": "evaluate"}]})
    message = str(caught.value)
    assert "revision 'v9'" in message and "main" in message  # and the refs the cache does hold
    with pytest.raises(HubModelError):
        resolve_hub_model(REPO, "f" * 40)


def test_revision_only_with_a_hub_id_and_never_a_path(hub_home):
    with pytest.raises(RecipeError, match="revision: applies to a Hugging Face Hub id"):
        parse_recipe({"model": "smollm2-135m", "revision": "main", "stages": [{"stage": "evaluate"}]})
    with pytest.raises(RecipeError, match="revision: 'a/../../x' is not a branch"):
        parse_recipe({"model": REPO, "revision": "a/../../x", "stages": [{"stage": "evaluate"}]})


def test_a_broken_snapshot_goes_through_the_folder_checks(hub_home):
    (hub_home / "model.safetensors").unlink()
    assert "no *.safetensors weights" in check_model_reference(REPO)
