"""A whole search on a tiny model: its pick equals an exhaustive evaluation, the budget holds on the real artifacts,
best.yaml reproduces its point, and a stopped search resumes without redoing finished work."""

from __future__ import annotations

import json

import pytest
import yaml

from a3q.checkpoint.stops import RunStopped, stop_points
from a3q.engine import StageError, run_recipe
from a3q.io.model_folder import config_json
from a3q.recipe import load_recipe, parse_recipe
from a3q.search import driver
from a3q.search.sizes import artifact_linear_bytes, model_shape
from a3q.search.space import parse_space
from a3q.search.state import SearchRefused
from tests.search.tiny import save_tiny_llama, tiny_space
from tests.stop_at import SignalAt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WEIGHTS = ["none", {"gptq": {"bits": 4, "group_size": 16}}, {"bnb": {"quant_type": "int8"}}]


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm2_path):
    return save_tiny_llama(tmp_path_factory.mktemp("search") / "model", smollm2_path)


@pytest.fixture(scope="module")
def searched(model, tmp_path_factory):
    """Six candidates, four inside 12 bits per parameter by estimate: every one of those is built."""
    root = tmp_path_factory.mktemp("searched")
    (root / "space.yaml").write_text(yaml.safe_dump(tiny_space(model, weights=WEIGHTS)))
    result = driver.run_search(root / "space.yaml", root / "out", progress=False)
    return root, result


def test_the_pick_equals_an_exhaustive_evaluation_of_every_candidate(searched, tmp_path):
    root, result = searched
    space, shape, _ = parse_space(yaml.safe_load((root / "space.yaml").read_text()))
    measured = {}
    for candidate in space.candidates():  # each built from the model in one run, without any reuse
        raw = space.recipe_for(candidate)
        raw["stages"].append({"stage": "export", "path": str(tmp_path / candidate.key / "artifact")})
        report = run_recipe(parse_recipe(raw), tmp_path / candidate.key, show_table=False).report
        ppl = next(row["ppl"] for row in report.rows if row.get("ppl") is not None)
        bits = 8 * artifact_linear_bytes(tmp_path / candidate.key / "artifact", shape.family) / shape.linear_params()
        measured[candidate.key] = (ppl, bits)
    inside = {key: ppl for key, (ppl, bits) in measured.items() if bits <= space.budget.bits_per_param}
    assert len(measured) == 6 and len(inside) == 4
    assert result.best["key"] == min(inside, key=inside.get)
    for point in result.points:  # the shared A³ artifact changes nothing
        assert point["ppl"] == pytest.approx(measured[point["key"]][0], rel=1e-6)
        assert point["bits_per_param"] == pytest.approx(measured[point["key"]][1], rel=1e-12)


def test_the_budget_holds_on_each_real_artifact_and_its_estimate_is_exact(searched):
    root, result = searched
    front = json.loads((root / "out" / "front.json").read_text())
    assert {p["key"] for p in front["points"]} == {p["key"] for p in result.points}
    assert len(result.points) == 4 and all(p["within_budget"] for p in result.points)
    for point in result.points:
        assert point["bits_per_param"] <= 12.0
        assert point["linear_bytes"] == point["estimated_linear_bytes"]  # uniform A³, GPTQ, int8: exact
    built = {p["key"] for p in result.points}
    assert "dense" not in built and "a3-0.25-uniform" not in built  # float weights: over 12 bits by estimate
    assert sum(p["best"] for p in front["points"]) == 1 and front["best"] == result.best["key"]
    for name in ("front.csv", "front.png", "best.yaml", "report.json"):
        assert (root / "out" / name).stat().st_size > 0
    assert (root / "out" / "front.csv").read_text().count("\n") == 1 + len(result.points)


def test_best_yaml_reproduces_its_points_perplexity(searched, tmp_path):
    root, result = searched
    report = run_recipe(load_recipe(root / "out" / "best.yaml"), tmp_path / "best", show_table=False).report
    ppl = next(row["ppl"] for row in report.rows if row.get("ppl") is not None)
    assert ppl == pytest.approx(result.best["ppl"], rel=1e-6)


def test_a_stopped_search_resumes_without_redoing_finished_work(model, tmp_path, monkeypatch):
    space = tiny_space(model, a3={"ratios": [0.25], "allocation": ["uniform"]}, weights=WEIGHTS[1:], evaluate_top=1)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    out = tmp_path / "out"
    with stop_points(SignalAt("group0.layer0:TERM")), pytest.raises(RunStopped):
        driver.run_search(tmp_path / "space.yaml", out, progress=False)  # inside the shared A³ build
    with pytest.raises(SearchRefused, match="already holds a search; pass --resume"):
        driver.run_search(tmp_path / "space.yaml", out, progress=False)

    calls = []
    real_run = driver.run_recipe

    def recording(recipe, folder, **kwargs):
        calls.append((folder.relative_to(out).as_posix(), kwargs["resume"]))
        return real_run(recipe, folder, **kwargs)

    monkeypatch.setattr(driver, "run_recipe", recording)
    first = driver.run_search(tmp_path / "space.yaml", out, resume=True, progress=False)
    (point,) = first.points
    assert calls == [("a3/a3-0.25-uniform", True), (f"runs/{point['key']}", False)]  # the A³ run continued

    calls.clear()  # a larger evaluate_top on resume: only the newly chosen candidate is built
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({**space, "evaluate_top": 2}))
    more = driver.run_search(tmp_path / "space.yaml", out, resume=True, progress=False)
    assert len(calls) == 1 and point in more.points and len(more.points) == 2
    calls.clear()
    again = driver.run_search(tmp_path / "space.yaml", out, resume=True, progress=False)
    assert calls == [] and again.points == more.points
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({**space, "budget": {"bits_per_param": 7.0}}))
    with pytest.raises(SearchRefused, match="differs from the one"):
        driver.run_search(tmp_path / "space.yaml", out, resume=True, progress=False)


def test_a_candidate_whose_real_artifact_breaks_the_budget_is_reported_not_picked(model, tmp_path):
    """Global ranks keep the uniform plan's parameters, not its GPTQ group rounding: on this model the estimate fits
    4.55 bits per parameter and the real artifact does not."""
    space = tiny_space(model, a3={"ratios": [0.25], "allocation": ["global"]}, weights=WEIGHTS[1:2],
                       budget={"bits_per_param": 4.55})
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    result = driver.run_search(tmp_path / "space.yaml", tmp_path / "out", progress=False)
    (point,) = result.points
    params = model_shape(config_json(str(model))).linear_params()
    assert 8 * point["estimated_linear_bytes"] / params <= 4.55 < point["bits_per_param"]  # the premise
    assert not point["within_budget"] and point["budget_problems"][0].startswith("bits_per_param 4.6")
    assert result.best is None and not (tmp_path / "out" / "best.yaml").exists()
    assert json.loads((tmp_path / "out" / "front.json").read_text())["best"] is None


def test_a_failing_candidate_is_reported_and_the_others_still_make_the_front(model, tmp_path, monkeypatch):
    space = tiny_space(model, a3={"ratios": [0.0]}, weights=WEIGHTS[1:])
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    real_run = driver.run_recipe

    def failing_int8(recipe, folder, **kwargs):
        if "int8" in folder.name:
            raise StageError("stages[0] (bnb): failed: a broken kernel")
        return real_run(recipe, folder, **kwargs)

    monkeypatch.setattr(driver, "run_recipe", failing_int8)
    result = driver.run_search(tmp_path / "space.yaml", tmp_path / "out", progress=False)
    assert [p["key"] for p in result.points] == ["dense+gptq-bits4-groupsize16"] and result.best is not None
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["failed"] == {"dense+bnb-quanttypeint8": "stages[0] (bnb): failed: a broken kernel"}
