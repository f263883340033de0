"""A³ for the MLP: shrink the intermediate size by keeping whole channels (CUR, no re-fit)."""

from __future__ import annotations

import torch
from torch import Tensor

from .linalg import validate_rank


def mlp_channel_scores(x2: Tensor, w_down: Tensor) -> Tensor:
    """Importance of each intermediate channel: ``λ_i = E[x_i²] · ‖W_down[i, :]‖²``.

    Why: dropping channel i removes ``x_i W_down[i, :]`` from the MLP output; ignoring correlations between
    channels, the expected squared error it adds is exactly ``λ_i``. ``x2`` is ``[d_ff]`` (the diagonal of
    ``E[x_dᵀ x_d]`` of down_proj's input) and ``w_down`` is row-convention ``[d_ff, d_model]`` (HF ``down_proj.weight.T``).
    """
    if x2.ndim != 1:
        raise ValueError(f"x2 must be [d_ff], got shape {tuple(x2.shape)}")
    if w_down.ndim != 2 or w_down.shape[0] != x2.shape[0]:
        raise ValueError(f"w_down must be [{x2.shape[0]}, d_model] to match x2, got shape {tuple(w_down.shape)}")
    return x2.to(torch.float64) * w_down.to(device=x2.device, dtype=torch.float64).square().sum(dim=1)


def select_channels(scores: Tensor, ff_rank: int) -> Tensor:
    """Indices (ascending) of the ``ff_rank`` highest-scoring channels; ties go to the lower index.

    Why: keeping the largest ``λ_i`` drops the least (diagonal) output energy. Ascending order keeps the
    compressed weights in the original channel order.
    """
    if scores.ndim != 1:
        raise ValueError(f"scores must be [d_ff], got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("channel scores contain NaN or Inf")
    validate_rank(ff_rank, scores.shape[0], "ff_rank")
    order = torch.argsort(scores.to(torch.float64), descending=True, stable=True)
    return order[:ff_rank].sort().values
