"""Hostile and broken inputs, property-based: recipes, recipe files, model folders, artifacts.

The contract under test is the same everywhere: bad input gets one clear error of a3q's own type, naming where the
problem is, fast, and nothing is written or loaded. No other exception type may escape (a traceback is a bug).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from a3q.io.manifest import ArtifactError, file_records, seal, verify_artifact
from a3q.io.model_folder import model_folder_problem
from a3q.recipe import MAX_REPORTED_PROBLEMS, RecipeError, load_recipe, parse_recipe

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

STAGE_NAMES = ["a3", "gptq", "bnb", "kv", "lora", "evaluate", "export", "reload", "svd", "svd_llm", "asvd", "nope"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
FIELD_NAMES = ["ratio", "bits", "group_size", "path", "max_windows", "seq_len", "split", "steps", "seed", "merge",
               "kv_ratio", "allocation", "quant_type", "components", "r", "verify", "damping", "zz"]


@st.composite
def recipes(draw):
    """Recipe-shaped dicts with arbitrary values: the validator must accept or refuse, never crash."""
    stage = st.tuples(st.sampled_from(STAGE_NAMES), st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=4))
    stages = draw(st.lists(stage.map(lambda pair: {"stage": pair[0], **pair[1]}), max_size=4))
    raw = {"model": draw(st.sampled_from(["smollm2-135m", "", "/nonexistent", "x" * 5000])), "stages": stages}
    if draw(st.booleans()):
        raw["calibration"] = draw(st.dictionaries(st.sampled_from(["windows", "seq_len", "seed", "split", "q"]), json_values, max_size=3))
    if draw(st.booleans()):
        raw[draw(st.sampled_from(["dtype", "output", "extra"]))] = draw(json_values)
    return raw


@FAST
@given(recipes())
def test_any_recipe_is_accepted_or_refused_with_located_problems(raw):
    try:
        recipe = parse_recipe(raw)
    except RecipeError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        assert len(str(exc).splitlines()) <= MAX_REPORTED_PROBLEMS + 2
        return
    assert [spec.name for spec in recipe.stages] == [stage["stage"] for stage in raw["stages"]]


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_as_a_recipe_file_give_a_recipe_error(tmp_path, data):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(data)
    try:
        load_recipe(path)
    except RecipeError:
        pass


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model: smollm2-135m\nmodel: other\nstages: [{stage: evaluate}]\n", "duplicate key 'model'"),
        ("model: smollm2-135m\nstages: [{stage: a3, ratio: '0.2'}]\n", "stages[0] (a3): ratio: Input should be a valid number"),
        ("model: smollm2-135m\nstages: [{stage: evaluate, max_windows: true}]\n", "stages[0] (evaluate): max_windows: Input should be a valid integer"),
        ("model: smollm2-135m\nstages: [{stage: evaluate, batch_size: 2.0}]\n", "batch_size: Input should be a valid integer"),
        ("model: smollm2-135m\ncalibration: {seed: 18446744073709551616}\nstages: [{stage: a3, ratio: 0.2}]\n", "calibration.seed:"),
        ("model: smollm2-135m\nstages: [{stage: lora, seed: -1}]\n", "stages[0] (lora): seed:"),
        ("a: &x [1]\nmodel: smollm2-135m\nstages: *x\n", "aliases"),
        ("model: " + "[" * 2000 + "\n", "nested too deeply"),
        ("model: " + "x" * 5000 + "\nstages: [{stage: evaluate}]\n", "model: String should have at most 4096 characters"),
        ("model: smollm2-135m\nstages: [{stage: a3, damping: 1e-4, ratio: 0.2}]\n", None),  # 1e-4 is a number (YAML 1.2)
    ],
    ids=["duplicate", "string-number", "bool-int", "float-int", "seed-64bit", "seed-negative", "alias", "deep",
         "long-model", "exponent-float"],
)
def test_recipe_reader_is_strict(tmp_path, text, expected):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    if expected is None:
        assert load_recipe(path).stages[0].config.damping == 1e-4
        return
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert expected in str(caught.value)


def test_non_utf8_and_huge_recipes_fail_fast_with_bounded_output(tmp_path):
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes("model: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8 text"):
        load_recipe(binary)

    huge = tmp_path / "huge.yaml"
    huge.write_text("model: smollm2-135m\nstages:\n" + "  - {stage: a3, ratio: 9}\n" * 60_000)
    started = time.perf_counter()
    with pytest.raises(RecipeError, match="a recipe may have at most") as caught:
        load_recipe(huge)
    assert time.perf_counter() - started < 5 and len(str(caught.value)) < 500

    many = {"model": "smollm2-135m", "stages": [{"stage": "a3", "ratio": 9}] * 200}
    with pytest.raises(RecipeError) as caught:
        parse_recipe(many)
    assert len(caught.value.problems) == 200 and "... and 180 more problem(s)" in str(caught.value)
    assert len(str(caught.value).splitlines()) == MAX_REPORTED_PROBLEMS + 2


# ---- model folders -----------------------------------------------------------------------------------------------


@pytest.fixture()
def model_folder(smollm2_path, tmp_path) -> Path:
    """A hard-linked copy of the real model folder, safe to break."""
    folder = tmp_path / "model"
    folder.mkdir()
    for file in smollm2_path.iterdir():
        os.link(file, folder / file.name)
    return folder


def _replace(path: Path, data: bytes) -> None:
    path.unlink()  # a hard link to the real model: never write through it
    path.write_bytes(data)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda f: _replace(f / "config.json", b'{"model_type": "llama",'), "config.json is not valid JSON"),
        (lambda f: _replace(f / "config.json", b"\xff\xfe"), "config.json is not UTF-8 text"),
        (lambda f: _replace(f / "config.json", b'{"model_type": "mamba"}'), "model_type 'mamba' is not supported (supported: llama"),
        (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer"),
        (lambda f: _replace(f / "model.safetensors", (f / "model.safetensors").read_bytes()[:1_000_000]), "model.safetensors is truncated"),
        (lambda f: _replace(f / "model.safetensors", b"\x00" * 4), "not even a safetensors header"),
        (lambda f: ((f / "model.safetensors").unlink(), (f / "pytorch_model.bin").write_bytes(b"x")), "never unpickles"),
    ],
)
def test_broken_model_folders_are_refused_at_validation(model_folder, damage, expected):
    damage(model_folder)
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"model": str(model_folder), "stages": [{"stage": "evaluate", "max_windows": 1}]})
    (problem,) = caught.value.problems
    assert problem.startswith("model: ") and expected in problem


@FAST
@given(data=st.binary(min_size=0, max_size=64), offset=st.integers(0, 400))
def test_garbage_in_config_or_weights_header_never_crashes_the_check(model_folder, data, offset):
    config = model_folder / "config.json"
    original = config.read_bytes()
    _replace(config, original[:offset] + data)
    assert model_folder_problem(model_folder) is None or isinstance(model_folder_problem(model_folder), str)
    _replace(config, original)
    weights = model_folder / "small.safetensors"
    weights.write_bytes(len(data).to_bytes(8, "little") + data)
    problem = model_folder_problem(model_folder)
    assert problem is None or "small.safetensors" in problem or "model.safetensors" in problem
    weights.unlink()


# ---- artifacts: any change to any file is caught, and named ------------------------------------------------------


def _small_artifact(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    (folder / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (folder / "a3q.json").write_text(json.dumps(seal({"format": 2, "structure": {"kv_cache": None},
                                                      "files": file_records(folder)})))
    return folder


@FAST
@given(which=st.sampled_from(["config.json", "adapter/adapter_config.json", "weights.bin", "a3q.json"]),
       offset=st.integers(0, 10_000), flip=st.integers(1, 255), cut=st.booleans())
def test_any_changed_byte_or_cut_in_any_file_is_refused_naming_it(tmp_path_factory, which, offset, flip, cut):
    folder = _small_artifact(tmp_path_factory.mktemp("a") / "art")
    verify_artifact(folder)
    path = folder / which
    data = bytearray(path.read_bytes())
    if cut:
        data = data[: offset % len(data)]
    else:
        data[offset % len(data)] ^= flip
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as caught:
        verify_artifact(folder)
    assert Path(which).name in str(caught.value)
