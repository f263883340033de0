"""A tiny Llama with SmolLM2's real tokenizer, saved as a model folder, and a small space over it (tests/search)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def save_tiny_llama(folder: Path, tokenizer_path: Path) -> Path:
    """Two layers, hidden 48, 4 heads / 2 KV heads of 16: every stage runs on it in about a second."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_space(model: Path, **overrides: Any) -> dict[str, Any]:
    """Eight candidates (no A³ / A³ 25% uniform × float, GPTQ 4-bit, nf4, int8) on a few 32-token windows."""
    space = {
        "model": str(model), "device": "cpu",
        "calibration": {"corpus": "enwiki", "split": "calib", "windows": 4, "seq_len": 32, "seed": 0},
        "evaluate": {"corpus": "enwiki", "split": "test", "seq_len": 32, "max_windows": 4},
        "budget": {"bits_per_param": 12.0},
        "a3": {"ratios": [0.0, 0.25], "allocation": ["uniform"]},
        "weights": ["none", {"gptq": {"bits": 4, "group_size": 16}}, {"bnb": {"quant_type": "nf4"}},
                    {"bnb": {"quant_type": "int8"}}],
        "evaluate_top": 8,
    }
    return {**space, **overrides}
