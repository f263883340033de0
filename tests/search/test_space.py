"""The space file is validated in full before anything loads; every refusal names its field."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from a3q.cli import app
from a3q.search import driver
from a3q.search.space import SpaceError, load_space, parse_space

MINIMAL = {  # the smallest space file: every axis at its default
    "model": "smollm2-135m",
    "calibration": {"corpus": "enwiki", "split": "calib", "windows": 16, "seq_len": 512, "seed": 0},
    "evaluate": {"corpus": "enwiki", "split": "test", "seq_len": 512, "max_windows": 8},
    "budget": {"bits_per_param": 3.5},
}


@pytest.fixture()
def nothing_loads(monkeypatch):
    """Any attempt to load a model (the proxy's load, or an engine run) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the space was validated")

    monkeypatch.setattr(driver, "load_graph", refuse)
    monkeypatch.setattr(driver, "run_recipe", refuse)


def _refused(tmp_path, space: dict) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    with pytest.raises(SpaceError) as caught:
        driver.run_search(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "search-state.json").exists()
    return str(caught.value)


def test_the_minimal_space_takes_every_default_and_sizes_each_candidate_from_config_json():
    space, shape, sizes = parse_space(MINIMAL)
    assert space.a3.ratios == [0.0, 0.1, 0.2, 0.3] and space.kv_entries() == ["none"]
    assert len(sizes) == 4 * 8 and shape.linear_params() == 30 * (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536)
    dense = next(size for candidate, size in sizes.items() if candidate.key == "dense")
    assert dense.bits_per_param == 32  # float32 on a CPU with dtype: auto
    assert sum(not space.budget.size_problems(size) for size in sizes.values()) > 0


@pytest.mark.parametrize("change, field, words", [
    ({"weights": []}, "weights:", "empty space"),
    ({"a3": {"ratios": []}}, "a3.ratios:", "empty space"),
    ({"kv": []}, "kv:", "empty space"),
    ({"budget": {"bits_per_param": 1.0}}, "budget.bits_per_param:", "smallest reachable is 2.25"),
    ({"budget": {"weight_bytes": 1000}}, "budget.weight_bytes:", "smallest reachable is"),
    ({"budget": {}}, "budget:", "at least one of"),
    ({"weights": [{"gptq": {"bits": 4}, "bnb": {"quant_type": "nf4"}}]}, "weights[0]:", "conflicting axes"),
    ({"weights": [{"gptq": {"bits": 5}}]}, "weights[0].gptq.bits:", "must be one of"),
    ({"weights": [{"awq": {}}]}, "weights[0]:", "unknown quantizer awq"),
    ({"kv": [{"bits": 8}]}, "kv[0].bits:", "cache_chunk"),
    ({"kv": ["none", None]}, "kv[1]:", "got NoneType"),
    ({"weights": ["none", 4]}, "weights[1]:", "got int"),
    ({"kv": [{"kv_ratio": 1.5}]}, "kv[0].kv_ratio:", "less than 1"),
    ({"a3": {"ratios": [0.2], "allocation": ["greedy"]}}, "a3.allocation.0:", "uniform"),
    ({"search_budget": 3}, "search_budget:", "Extra inputs"),
    ({"evaluate": {"max_windows": 0}}, "evaluate.max_windows:", "greater than or equal to 1"),
    ({"model": "/nowhere/at/all"}, "model:", "/nowhere/at/all"),
    ({"revision": "main"}, "revision:", "Hub id"),
])
def test_a_bad_space_is_refused_naming_its_field_before_anything_loads(tmp_path, nothing_loads, change, field, words):
    message = _refused(tmp_path, {**MINIMAL, **change})
    line = next(line for line in message.splitlines() if field in line)
    assert words in line, message


def test_every_candidate_recipe_passes_the_recipe_checks(tmp_path, nothing_loads, monkeypatch):
    """What only a whole recipe checks (here the device, against this machine) refuses the space, once."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    message = _refused(tmp_path, {**MINIMAL, "device": "cuda:0"})
    assert message.count("\n  device:") == 1 and "CUDA is not available" in message, message


def test_a_space_file_is_read_as_strictly_as_a_recipe(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("model: smollm2-135m\nmodel: smollm2-135m\n")
    with pytest.raises(SpaceError, match="duplicate key 'model'"):
        load_space(path)
    with pytest.raises(SpaceError, match="space file .* does not exist"):
        load_space(tmp_path / "missing.yaml")


def test_the_command_line_names_the_field_in_one_line_and_exits_2(tmp_path, nothing_loads):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "budget": {"bits_per_param": 1.0}}))
    result = CliRunner().invoke(app, ["search", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "budget.bits_per_param:" in result.output and "Traceback" not in result.output


def test_list_valued_stage_fields_make_hashable_candidates_with_folder_safe_keys():
    space, _, sizes = parse_space({**MINIMAL, "a3": {"ratios": [0.0]}, "budget": {"bits_per_param": 12.0},
                                   "weights": [{"gptq": {"bits": 4, "skip_modules": ["mlp.down_proj", "layers.0."]}}]})
    (candidate,) = sizes
    assert candidate.stages() == [{"stage": "gptq", "bits": 4, "skip_modules": ["mlp.down_proj", "layers.0."]}]
    assert candidate.key == "dense+gptq-bits4-skipmodulesmlp.downprojlayers.0."


def test_a_space_of_millions_of_candidates_is_refused_by_its_count_before_any_is_built(tmp_path, nothing_loads):
    space = {**MINIMAL, "a3": {"ratios": [i / 100 for i in range(64)], "allocation": ["uniform", "global"]},
             "weights": ["none"] + [{"gptq": {"bits": 4, "group_size": 8 * (i + 1)}} for i in range(255)],
             "kv": ["none"] + [{"kv_ratio": (i + 1) / 300} for i in range(255)]}
    assert "(axes): 8,323,072 candidates; a space may have at most 2,000" in _refused(tmp_path, space)
    small = parse_space({**MINIMAL, "a3": {"ratios": [0.0, 0.1, 0.1], "allocation": ["uniform", "global"]}})[0]
    assert small.count() == len(small.candidates()) == 3 * 8
