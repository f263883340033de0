"""Hostile input on the run's surfaces: processes, the output folder, manifests, model files, the order of checks.

Every user error is one line and exit code 2, before any work, and loses nothing (issue 27). Text sources, checkpoints
and offload stores have their own tests (tests/calib, tests/checkpoint, tests/test_offload.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer
from typer.testing import CliRunner

from a3q.cli import app
from a3q.io.manifest import ArtifactError, file_records, read_manifest, seal
from a3q.io.model_folder import model_folder_problem
from a3q.io.run_lock import LOCK_NAME, RunLock
from a3q.recipe import RecipeError, parse_recipe

runner = CliRunner()
SMALL = {"corpus": "enwiki", "split": "calib", "windows": 2, "seq_len": 64, "seed": 0}


def _recipe(path: Path, calibration: dict | None = None, stages: list | None = None, model: str = "smollm2-135m"):
    path.write_text(yaml.safe_dump({"model": model, "calibration": calibration or SMALL,
                                    "stages": stages or [{"stage": "a3", "ratio": 0.2}]}))
    return path


def _one_line_error(result) -> str:
    """The output of a refused command: exit code 2, one ``error:`` line, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


# ---- processes: checked before any is started ---------------------------------------------------------------------


def test_nproc_with_too_few_batches_is_refused_before_any_process_starts(tmp_path, monkeypatch):
    monkeypatch.setattr("a3q.distributed.launch", lambda *a, **k: pytest.fail("a process was started"))
    recipe = _recipe(tmp_path / "r.yaml")
    line = _one_line_error(runner.invoke(app, ["run", str(recipe), "--out", str(tmp_path / "o"), "--nproc", "64"]))
    assert "2 window(s) in batches of 4 make 1 batch(es), too few for 64 processes" in line and "--nproc 1" in line
    assert not (tmp_path / "o" / "report.json").exists()


def test_nproc_beyond_the_machines_memory_says_how_many_fit(tmp_path, monkeypatch):
    """Enough batches for 1000 processes, but not the memory of 1000 loaded models (on any machine)."""
    monkeypatch.setattr("a3q.distributed.launch", lambda *a, **k: pytest.fail("a process was started"))
    recipe = _recipe(tmp_path / "r.yaml", {**SMALL, "windows": 4000, "seq_len": 8})
    line = _one_line_error(runner.invoke(app, ["run", str(recipe), "--out", str(tmp_path / "o"), "--nproc", "1000"]))
    assert "memory: 1000 processes need about" in line and "process(es) fit (--nproc" in line


def test_a_malformed_collective_timeout_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("A3Q_COLLECTIVE_TIMEOUT_S", "abc")
    recipe = _recipe(tmp_path / "r.yaml", {**SMALL, "windows": 8})
    line = _one_line_error(runner.invoke(app, ["run", str(recipe), "--out", str(tmp_path / "o"), "--nproc", "2"]))
    assert "A3Q_COLLECTIVE_TIMEOUT_S='abc' is not a number of seconds" in line


# ---- one run per output folder ----------------------------------------------------------------------------------


def test_a_second_run_on_a_held_output_folder_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "report.json").write_text('{"status": "running"}')  # the first run's
    with RunLock(out):
        line = _one_line_error(runner.invoke(app, ["run", str(_recipe(tmp_path / "r.yaml")), "--out", str(out)]))
        again = _one_line_error(runner.invoke(app, ["run", str(_recipe(tmp_path / "r.yaml")), "--out", str(out),
                                                    "--nproc", "2"]))
    assert f"is in use by another a3q run (pid {os.getpid()}" in line and "in use by another a3q run" in again
    assert (out / "report.json").read_text() == '{"status": "running"}'  # not overwritten


def test_a_killed_runs_lock_does_not_outlive_it(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from a3q.io.run_lock import RunLock; RunLock(Path(sys.argv[1])).acquire(); "
                               "print('held', flush=True); time.sleep(600)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match=f"pid {holder.pid}"):
            RunLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunLock(out).acquire().release()  # the kernel dropped the dead process's lock


def test_a_symlinked_lock_file_is_not_followed(tmp_path):
    out, elsewhere = tmp_path / "o", tmp_path / "precious.txt"
    out.mkdir()
    elsewhere.write_text("keep me")
    (out / LOCK_NAME).symlink_to(elsewhere)
    line = _one_line_error(runner.invoke(app, ["run", str(_recipe(tmp_path / "r.yaml")), "--out", str(out)]))
    assert "is a symlink" in line and elsewhere.read_text() == "keep me"


@pytest.mark.parametrize("kind", ["file", "uncreatable"])
def test_an_unusable_out_is_one_line(tmp_path, kind):
    out = tmp_path / "taken"
    out.write_text("a file")
    if kind == "uncreatable":
        out = out / "below"
    line = _one_line_error(runner.invoke(app, ["run", str(_recipe(tmp_path / "r.yaml")), "--out", str(out)]))
    assert "--out:" in line and (tmp_path / "taken").read_text() == "a file"


# ---- manifests and model files: wrong types and odd files are named ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2_path) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer (validation reads only files and headers)."""
    from tests.stages.a3.test_pipeline_tiny import tiny_llama

    folder = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_llama().save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(smollm2_path)).save_pretrained(folder)
    return folder


def _artifact_with(folder: Path, target: Path, **fields) -> Path:
    """``folder`` as a sealed artifact whose manifest has ``fields`` (resealed: only the types are wrong)."""
    shutil.copytree(folder, target)
    manifest = {"format": 2, "a3q_version": "0.1.0", "recipe": None, "report": [], "structure": {"history": []},
                "files": file_records(target), **fields}
    (target / "a3q.json").write_text(json.dumps(seal(manifest)))
    return target


@pytest.mark.parametrize("fields,field", [
    ({"format": "abc"}, "format"), ({"files": []}, "files"), ({"report": {"a": 1}}, "report"),
    ({"structure": {"history": "x"}}, "structure.history"), ({"recipe": [1]}, "recipe"),
    ({"structure": {"kv_cache": 8}}, "structure.kv_cache"),
])
def test_a_manifest_with_fields_of_the_wrong_type_is_refused_everywhere(tiny_folder, tmp_path, fields, field):
    art = _artifact_with(tiny_folder, tmp_path / "art", **fields)
    with pytest.raises(ArtifactError, match=f"field '{field}'"):
        read_manifest(art)
    for command in (["verify", str(art)], ["inspect", str(art)], ["eval", str(art), "--max-windows", "1"]):
        assert f"field '{field}'" in _one_line_error(runner.invoke(app, command))
    with pytest.raises(RecipeError, match=f"field '{field}'"):  # a recipe's model:
        parse_recipe({"model": str(art), "stages": [{"stage": "evaluate"}]})


@pytest.mark.parametrize("damage,expected", [
    ("tokenizer_not_json", "tokenizer.json is not valid JSON"),
    ("tokenizer_symlink_out", "tokenizer.json is a symlink to"),
    ("weights_symlink_out", "weights file model.safetensors is a symlink to"),
    ("weights_fifo", "weights file model.safetensors is not a regular file"),
    ("config_symlink_out", "config.json is a symlink to"),
])
def test_odd_model_files_are_named(tiny_folder, tmp_path, damage, expected):
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    outside = tmp_path / "outside"
    outside.mkdir()
    name = {"tokenizer": "tokenizer.json", "weights": "model.safetensors", "config": "config.json"}[damage.split("_")[0]]
    if damage == "tokenizer_not_json":
        (folder / name).write_text("{not json")
    elif damage == "weights_fifo":
        (folder / name).unlink()
        os.mkfifo(folder / name)
    else:
        shutil.move(folder / name, outside / name)
        (folder / name).symlink_to(outside / name)
    assert expected in model_folder_problem(folder)
    assert expected in _one_line_error(runner.invoke(app, ["eval", str(folder), "--max-windows", "1"]))


def test_a_hub_snapshots_links_into_its_blobs_are_fine(tiny_folder, tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in tiny_folder.iterdir():
        shutil.copyfile(file, blobs / file.name)
        (snapshot / file.name).symlink_to(Path("../../blobs") / file.name)
    assert model_folder_problem(snapshot) is None


# ---- fail before work, not after ---------------------------------------------------------------------------------


def test_eval_checks_its_text_and_its_json_target_before_loading_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr("a3q.io.loading.load_graph", lambda *a, **k: pytest.fail("the model was loaded"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    line = _one_line_error(runner.invoke(app, ["eval", "smollm2-135m", "--path", str(bad), "--text-field", "text"]))
    assert "bad.jsonl" in line
    line = _one_line_error(runner.invoke(app, ["eval", "smollm2-135m", "--max-windows", "1", "--json", str(tmp_path)]))
    assert "--json:" in line and "is not a file" in line


def test_resume_without_a_checkpoint_refuses_before_reading_text(tmp_path, monkeypatch):
    monkeypatch.setattr("a3q.engine.check_text", lambda recipe: pytest.fail("the text was read"))
    result = runner.invoke(app, ["run", str(_recipe(tmp_path / "r.yaml")), "--out", str(tmp_path / "o"), "--resume"])
    assert "there is no checkpoint" in _one_line_error(result)


def test_an_unknown_lm_eval_task_is_refused_at_validation(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: my_wiki\ndataset_path: json\noutput_type: loglikelihood_rolling\n"
                                     "doc_to_text: ''\ndoc_to_target: '{{text}}'\ntest_split: test\n")
    with pytest.raises(RecipeError, match=r"unknown task\(s\) 'my_wik' \(did you mean 'my_wiki'\?\)"):
        parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "a3", "ratio": 0.2},
                                                          {"stage": "lm_eval", "tasks": ["my_wik"],
                                                           "include_path": str(tasks)}]})


def test_python_dash_m_a3q_is_the_command_line():
    done = subprocess.run([sys.executable, "-m", "a3q", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "run" in done.stdout and "Usage: a3q" in done.stdout.replace("python -m ", "")

