"""A baseline's artifact loads right everywhere, or not at all: never as a dense model with random weights."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

import a3q
from a3q.recipe import parse_recipe
from a3q.engine import run_recipe
from tests.remote_code import remote_code_logits

_PLAIN = textwrap.dedent(
    """
    import sys
    sys.modules["a3q"] = None
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
    """
)


def test_factored_artifact_needs_remote_code_and_then_matches(tmp_path):
    recipe = parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "svd", "ratio": 0.1},
                                                             {"stage": "export", "path": str(tmp_path / "svd")}]})
    result = run_recipe(recipe, tmp_path / "run", show_table=False)
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 2]])
    with torch.no_grad():
        expected = result.graph.model(input_ids=ids).logits

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    plain = subprocess.run([sys.executable, "-c", _PLAIN, str(tmp_path / "svd")], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode != 0, "plain transformers built a model from a factored artifact"
    assert "trust_remote_code" in plain.stderr

    remote = remote_code_logits(tmp_path / "svd", ids, expected_class="A3LlamaForCausalLM")
    assert torch.equal(remote, expected)
    with torch.no_grad():
        assert torch.equal(a3q.load(str(tmp_path / "svd")).model(input_ids=ids).logits, expected)
