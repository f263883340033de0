"""Serving tests: run in ``.venv-serve`` (``make serve-test``), where vLLM and a3q's plugin are installed.

a3q's own venv (``.venv``, no vLLM) does not collect this folder, so ``make test`` is unaffected. Here:

* **Artifacts** are made by a3q itself (``.venv/bin/a3q run``, real models, small calibration) into
  ``out/serving-tests/`` (or ``$A3Q_SERVE_TEST_DIR``), once: a folder whose recipe is unchanged and whose manifest
  verifies is reused.
* **References** are transformers' greedy generations of the same folders, run in ``.venv`` by
  ``hf_reference.py`` (a3q's transformers version, ``trust_remote_code`` for A³ artifacts) and cached next to the
  artifact, keyed by its manifest seal, the prompts and the length.
* **vLLM** runs in float32 with ``enforce_eager`` (torch.compile on 2 cores costs a minute per model; the compiled
  path is checked by the ``slow`` test), one ``LLM`` per artifact per module, shut down after it.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from tests.serving.helpers import WORK, build_artifact, configure_environment

if importlib.util.find_spec("vllm") is None:  # a3q's own venv: nothing here to run
    collect_ignore_glob = ["test_*.py"]
else:
    configure_environment()


@pytest.fixture(scope="session")
def artifacts():
    """name -> artifact folder, built on first use."""
    failed: dict[str, str] = {}

    class Lazy(dict):
        def __missing__(self, name):
            if name in failed:  # one build attempt per session: later tests fail at once with the same reason
                pytest.fail(failed[name], pytrace=False)
            try:
                self[name] = build_artifact(name)
            except pytest.fail.Exception as exc:
                failed[name] = str(exc)
                raise
            return self[name]

    return Lazy()


@pytest.fixture(scope="session")
def derived_dir():
    """Scratch space for edited copies of artifacts (hard links: same file system as the artifacts)."""
    folder = WORK / "derived"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)

