"""Transformers' greedy generation of a model folder, as JSON: the reference the vLLM tests compare against.

Run in a3q's own venv (``.venv``: the transformers a3q exports for and tests with), in its own process:

    .venv/bin/python tests/serving/hf_reference.py FOLDER PROMPTS.json MAX_NEW_TOKENS OUT.json

A3Q artifacts load with ``trust_remote_code=True`` (the modeling files the artifact ships, as a user without a3q
would load them); dense folders load with transformers' own class. float32, batch 1 per prompt, eager attention.
EOS does not stop generation (vLLM runs with ``ignore_eos``), so every continuation has MAX_NEW_TOKENS tokens.

A prompt is a string, or a list of token ids (then no tokenizer is loaded).
Output per prompt: ``prompt_ids``; ``prompt_logprobs`` (log-softmax of the prompt forward at each next prompt
token); ``ids`` (the new tokens); ``logprobs`` (each new token's log-probability under the raw logits).
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(folder: str, prompts_path: str, max_new_tokens: int, out_path: str) -> None:
    torch.manual_seed(0)
    config = json.load(open(f"{folder}/config.json"))
    remote = "auto_map" in config
    tokenizer = None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote,
                                                 attn_implementation="eager")
    model.eval()
    generation_config = model.generation_config
    generation_config.update(eos_token_id=None, do_sample=False, max_new_tokens=max_new_tokens, output_logits=True,
                             return_dict_in_generate=True)
    results = []
    for prompt in json.load(open(prompts_path)):
        if isinstance(prompt, list):  # token ids (tiny test models have no tokenizer)
            ids = torch.tensor([prompt])
        else:
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
            ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0].float()
            prompt_logprobs = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
            out = model.generate(ids, generation_config=generation_config)
        new = out.sequences[0, ids.shape[1]:]
        logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, new)]
        results.append({"prompt": prompt, "prompt_ids": ids[0].tolist(), "prompt_logprobs": prompt_logprobs.tolist(),
                        "ids": new.tolist(), "logprobs": logprobs})
    json.dump({"folder": folder, "transformers": __import__("transformers").__version__,
               "torch": torch.__version__, "results": results}, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
