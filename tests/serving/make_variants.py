"""Tiny random A³ artifacts of the Llama-family variants no bundled real model covers, for the vLLM tests.

Run in a3q's own venv (``.venv``), in its own process, from the repository root:
``.venv/bin/python -m tests.serving.make_variants OUT_DIR``.

* ``mistral``: every layer slides (window 8);
* ``qwen2``: q/k/v biases (random, non-zero), windows on the upper layers only;
* ``llama3``: Llama 3.x RoPE scaling (``rope_type: llama3``), attention and MLP biases (``o_bias`` too).

Each is a random model with head dim 64 (vLLM's CPU attention runs 64), compressed by a3q's own test helper
(random kept RoPE pairs per layer, q/k 40 and v/o 48: both padded to 64 when served) and written with
``save_with_remote_code`` plus an a3q manifest (sealed, every file hashed), so the plugin's checks pass. No tokenizer:
prompts are token ids. Weights are sharpened (tests/modeling/random_weights.py, as the modeling tests do) so that
attention is far from uniform and greedy choices are not near-ties.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from a3q.io.manifest import FORMAT_VERSION, MANIFEST_NAME, file_records, seal
from a3q.arch.auto import save_with_remote_code, to_a3_model
from tests.arch.family_checks import compressed_and_zeroed
from tests.modeling.random_weights import sharpen_llama

SIZES = dict(vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def dense(kind: str):
    torch.manual_seed(0)
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**SIZES, sliding_window=8))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=8, max_window_layers=1))
    else:
        model = LlamaForCausalLM(LlamaConfig(**SIZES, rope_parameters=LLAMA3_ROPE, attention_bias=True,
                                             mlp_bias=True))
    return sharpen_llama(model, embedding_scale=20.0)


def main(out: str) -> None:
    for kind in ("mistral", "qwen2", "llama3"):
        compressed, _ = compressed_and_zeroed(to_a3_model(dense(kind)), r_qk=40, r_vo=48, r_ff=96)
        folder = Path(out) / kind
        save_with_remote_code(compressed, folder)
        manifest = {"format": FORMAT_VERSION, "a3q_version": "test", "recipe": {"tiny": kind}, "report": [],
                    "files": file_records(folder)}
        (folder / MANIFEST_NAME).write_text(json.dumps(seal(manifest)))


if __name__ == "__main__":
    main(sys.argv[1])
