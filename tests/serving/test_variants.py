"""The Llama class on the family variants no bundled real model has: Mistral (every layer slides), Qwen2 (q/k/v
biases, windows on the upper layers), Llama 3.x (llama3 RoPE scaling, attention, o_proj and MLP biases).

Tiny random A³ models (make_variants.py: random kept RoPE pairs per layer, q/k 40 and v/o 48, padded to 64 when
served), token-id prompts of 24 to 40 tokens (longer than the 8-token windows), 40 greedy tokens: vLLM must give
transformers' tokens (remote code) and logprobs within the same tolerance as the real models.
"""

from __future__ import annotations

import random

import pytest

from tests.serving.helpers import LOGPROB_TOL, NEW_TOKENS, build_variants, make_llm, reference, shutdown


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(1, 256) for _ in range(length)] for length in (24, 31, 40)]


@pytest.fixture(scope="module", params=["mistral", "qwen2", "llama3"])
def variant(request):
    folder = build_variants() / request.param
    ref = reference(folder, _prompts())
    llm = make_llm(folder, max_model_len=256, skip_tokenizer_init=True)
    yield request.param, ref, llm
    shutdown(llm)


def test_variant_matches_transformers(variant):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    kind, ref, llm = variant
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0, prompt_logprobs=0,
                            detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in ref["results"]], params,
                        use_tqdm=False)
    for r, out in zip(ref["results"], outs):
        completion = out.outputs[0]
        assert list(completion.token_ids) == r["ids"], kind
        logprobs = [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)]
        prompt_logprobs = [step[t].logprob for step, t in zip(out.prompt_logprobs[1:], r["prompt_ids"][1:])]
        deviation = max(max(abs(a - b) for a, b in zip(logprobs, r["logprobs"])),
                        max(abs(a - b) for a, b in zip(prompt_logprobs, r["prompt_logprobs"])))
        assert deviation <= LOGPROB_TOL, (kind, deviation)
