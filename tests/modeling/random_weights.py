"""Random weights that make a tiny model's tests meaningful (shared by the modeling and serving tests)."""

from __future__ import annotations

import torch


def sharpen_llama(model: torch.nn.Module, embedding_scale: float | None = None) -> torch.nn.Module:
    """Non-zero biases, norm gains away from 1 and q/k weights ×4, so attention is far from uniform and an error in
    RoPE, the softmax scale or a bias shows; ``embedding_scale`` also scales the embeddings and LM head, so greedy
    choices are not near-ties."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
            elif embedding_scale is not None and name.endswith(("embed_tokens.weight", "lm_head.weight")):
                p.mul_(embedding_scale)
    return model.eval()
