"""The same equality with vLLM's default execution: torch.compile (Dynamo + Inductor), as ``vllm serve`` runs.

The other tests run eager to stay fast (compiling costs about a minute per model on 2 cores); the plugin's layers
must also trace and compile, and compiled kernels must not change the tokens. Marked ``slow``.
"""

from __future__ import annotations

import pytest

from tests.serving.helpers import LOGPROB_TOL, NEW_TOKENS, make_llm, reference, shutdown

pytestmark = pytest.mark.slow


def test_compiled_generation_matches_transformers(artifacts):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    folder = artifacts["smollm2-a3-20"]
    ref = reference(folder)["results"]
    llm = make_llm(folder, enforce_eager=False)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in ref],
                            SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0),
                            use_tqdm=False)
    finally:
        shutdown(llm)
    for r, out in zip(ref, outs):
        completion = out.outputs[0]
        assert list(completion.token_ids) == r["ids"]
        logprobs = [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)]
        assert max(abs(a - b) for a, b in zip(logprobs, r["logprobs"])) <= LOGPROB_TOL
