"""Shared check for the compressed model classes: decoding token by token through the KV cache."""

from __future__ import annotations

import torch


@torch.no_grad()
def incremental_logits(model, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Logits of ``ids`` from a forward over the first ``prefix`` tokens, then one token at a time with the cache
    (to compare with one full forward)."""
    out = model(input_ids=ids[:, :prefix], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(prefix, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    return torch.cat(steps, dim=1)
