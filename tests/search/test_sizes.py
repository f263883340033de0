"""Sizes from config.json alone against the bytes the real artifact stores, for every quantizer and the KV cache."""

from __future__ import annotations

import pytest
import torch

from a3q.engine import apply_stages
from a3q.io.artifact import save_artifact
from a3q.io.loading import load_graph
from a3q.io.model_folder import config_json
from a3q.search.candidate import Candidate
from a3q.search.sizes import artifact_linear_bytes, estimate, model_shape
from tests.search.tiny import save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fields(stage: str, **fields) -> tuple:
    return tuple(sorted({"stage": stage, **fields}.items()))


CASES = [  # (candidate, bytes the estimate may exceed the artifact by, per linear)
    (Candidate(), 0),
    (Candidate(a3_ratio=0.3, allocation="uniform"), 0),
    (Candidate(weights=_fields("gptq", bits=3, group_size=32)), 0),
    (Candidate(weights=_fields("gptq", bits=8, group_size=-1)), 0),
    (Candidate(a3_ratio=0.25, allocation="uniform", weights=_fields("gptq", bits=4, group_size=16),
               kv=_fields("kv", kv_ratio=0.5)), 0),
    (Candidate(weights=_fields("bnb", quant_type="int8")), 0),
    (Candidate(weights=_fields("gptq", bits=4, group_size=16, skip_modules=("mlp.down_proj", "layers.0.")),), 0),
    # nf4's quant state is a JSON blob holding a float; its digits are known only once quantized: an upper bound
    (Candidate(weights=_fields("bnb", quant_type="nf4")), 24),
    (Candidate(a3_ratio=0.2, allocation="uniform", weights=_fields("bnb", quant_type="fp4", double_quant=False)), 24),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm2_path):
    return save_tiny_llama(tmp_path_factory.mktemp("sizes") / "model", smollm2_path)


@pytest.mark.parametrize("candidate, slack", CASES, ids=[c.key for c, _ in CASES])
def test_the_estimate_matches_the_real_artifacts_decoder_linear_bytes(model, tmp_path, candidate, slack):
    shape = model_shape(config_json(str(model)))
    predicted = estimate(shape, candidate, float_bytes=4)
    graph = load_graph(model)
    windows = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    stages = [(s.pop("stage"), s) for s in candidate.stages()]
    for stage in stages:
        if stage[0] == "a3":
            stage[1]["batch_size"] = 2
    graph, _ = apply_stages(graph, stages, windows)
    real = artifact_linear_bytes(save_artifact(graph, tmp_path / "artifact", recipe=None, report=[]), shape.family)
    linears = 7 * len(shape.layers)
    assert real <= predicted.linear_bytes <= real + slack * linears
    every_linear_quantized = candidate.weights is not None and "skip_modules" not in dict(candidate.weights)
    if every_linear_quantized and slack == 0:  # the graph's own account (it counts float linears at bf16) agrees
        assert predicted.linear_bytes == graph.decoder_linear_bytes()
    assert predicted.kv_bytes_per_token == graph.kv_bytes_per_token()
