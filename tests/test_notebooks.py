"""The quickstart notebook runs top to bottom (small budget), in a temporary working directory.

Executed with nbclient on the kernel of the interpreter running the tests (the project's venv), so the
notebook sees the same a3q, the same offline model cache and the same thread count.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "clear the notebook's outputs before committing"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("A3Q_NOTEBOOK_CALIB_WINDOWS", "2")
    monkeypatch.setenv("A3Q_NOTEBOOK_EVAL_WINDOWS", "2")
    monkeypatch.setenv("A3Q_NOTEBOOK_BASELINES", "SVD-LLM")  # one SVD sweep keeps the test short
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOKS.parent), os.environ.get("PYTHONPATH")])))
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    assert (tmp_path / "perplexity_vs_ratio.png").stat().st_size > 0
    assert (tmp_path / "out" / "smollm2-a3-20" / "a3q.json").is_file()
    printed = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "export → a3q.load gives identical logits: True" in printed
    assert sys.executable  # the kernel is this interpreter's (ipykernel's python3 spec)
