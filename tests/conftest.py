"""Shared fixtures. The real model and corpus are prepared offline by `make test` (a3q.assets)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("A3Q_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct as a ModelGraph (float32), loaded once per session.

    Tests must not modify it in place: stages that change a model work on a deep copy.
    """
    from a3q.io.loading import load_graph

    return load_graph("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_path():
    from a3q.assets.models import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``).

    Why: GPTQ's column loop is many small ops that two OpenMP threads on a busy 2-core machine slow down, and its codes
    flip where float summation order changes a rounding, so numbers pinned with one thread need one thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
