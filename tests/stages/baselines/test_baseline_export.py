"""A baseline's artifact loads right everywhere, or not at all: never as a dense model with random weights.

The mechanism (a3q's model class rebuilding two-factor linears from ``config.a3q_factorized``) does not depend on the
model's size, so a tiny Llama with the real tokenizer keeps this fast; ``test_baselines`` covers SmolLM2 itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from a3q.arch import describe
from a3q.io.artifact import save_artifact
from tests.remote_code import remote_code_logits
from tests.stages.a3.test_pipeline_tiny import tiny_llama, tokens
from tests.stages.baselines.test_baselines import logits, run_stage

_PLAIN = textwrap.dedent(
    """
    import sys
    sys.modules["a3q"] = None
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
    """
)


def test_factored_artifact_needs_remote_code_and_then_matches(smollm2, tmp_path):
    graph = describe(tiny_llama(kv_heads=2), tokenizer=smollm2.tokenizer, source="tiny")
    factored, _ = run_stage("svd_llm", graph, tokens(), ratio=0.3)
    path = save_artifact(factored, tmp_path / "svd_llm", recipe=None, report=[])
    ids = tokens(2, 16)

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    plain = subprocess.run([sys.executable, "-c", _PLAIN, str(path)], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode != 0, "plain transformers built a model from a factored artifact"
    assert "trust_remote_code" in plain.stderr

    remote = remote_code_logits(path, ids, expected_class="A3LlamaForCausalLM")
    assert torch.equal(remote, logits(factored, ids))
