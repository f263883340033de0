"""Recipe validation: every problem is caught before a model loads, and named precisely."""

from __future__ import annotations

import pytest

from a3q.recipe import RecipeError, load_recipe, parse_recipe

GOOD = {
    "model": "smollm2-135m",
    "calibration": {"corpus": "enwiki", "split": "calib", "windows": 4, "seq_len": 64, "seed": 0},
    "stages": [{"stage": "evaluate", "split": "test", "max_windows": 2}, {"stage": "export", "path": "out/x"}],
}


def _problems(raw: dict) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(raw)
    return caught.value.problems


def test_good_recipe_parses_into_typed_configs():
    recipe = parse_recipe(GOOD)
    assert [spec.name for spec in recipe.stages] == ["evaluate", "export"]
    assert recipe.stages[0].config.max_windows == 2
    assert recipe.stages[0].config.seq_len == 512  # default
    assert recipe.calibration.windows == 4


def test_unknown_stage_is_named_with_its_index():
    raw = {**GOOD, "stages": [GOOD["stages"][0], {"stage": "compress_magic"}]}
    (problem,) = _problems(raw)
    assert problem.startswith("stages[1]: unknown stage 'compress_magic'")
    assert "evaluate" in problem  # lists the known stages


def test_unknown_key_names_stage_and_field():
    raw = {**GOOD, "stages": [{"stage": "evaluate", "max_windowz": 3}]}
    (problem,) = _problems(raw)
    assert problem.startswith("stages[0] (evaluate): max_windowz:")
    assert "Extra inputs are not permitted" in problem


def test_wrong_type_and_impossible_value_are_both_reported():
    raw = {**GOOD, "stages": [{"stage": "evaluate", "seq_len": "long", "max_windows": 0}]}
    problems = _problems(raw)
    assert any(p.startswith("stages[0] (evaluate): seq_len:") for p in problems)
    assert any(p.startswith("stages[0] (evaluate): max_windows:") for p in problems)


def test_missing_model_and_bad_calibration():
    raw = {k: v for k, v in GOOD.items() if k != "model"}
    raw["calibration"] = {"corpus": "enwiki", "windows": -1}
    problems = _problems(raw)
    assert any(p.startswith("model: Field required") for p in problems)
    assert any(p.startswith("calibration.windows:") for p in problems)


def test_model_that_is_neither_alias_nor_folder(tmp_path):
    problems = _problems({**GOOD, "model": str(tmp_path / "nope")})
    assert problems == [f"model: '{tmp_path / 'nope'}' is neither a known alias (smollm2-135m, gemma3-270m) nor an existing folder"]
    (tmp_path / "empty").mkdir()
    problems = _problems({**GOOD, "model": str(tmp_path / "empty")})
    assert "no config.json" in problems[0]


def test_unknown_top_level_key_and_missing_stage_name():
    problems = _problems({**GOOD, "modle": "x", "stages": [{"split": "test"}]})
    assert "modle: Extra inputs are not permitted" in problems
    assert "stages[0]: missing 'stage' (the stage name)" in problems


def test_reload_without_export_is_refused():
    (problem,) = _problems({**GOOD, "stages": [{"stage": "reload"}]})
    assert problem == "stages[0] (reload): path: not given and no earlier 'export' stage to reload from"


def test_export_refuses_to_overwrite_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    (problem,) = _problems({**GOOD, "stages": [{"stage": "export", "path": str(foreign)}]})
    assert problem.startswith("stages[0] (export): path:") and "not an a3q artifact" in problem
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_yaml_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="expected a mapping"):
        load_recipe(listy)


def test_every_shipped_recipe_validates():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        load_recipe(path)
