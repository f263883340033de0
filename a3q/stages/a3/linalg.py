"""Symmetric square roots of second-moment matrices: the one decomposition every A³ solution needs.

All A³ objectives have the form ``‖T (W − W̃)‖²`` (or two-sided ``‖T_q (W − W̃) T_k‖²``) with ``TᵀT = G`` a second
moment of a head's activations, so the optimum is an SVD in "whitened" coordinates followed by un-whitening
with ``T⁺``. This module computes that pair ``(T, T⁺)`` robustly.
"""

from __future__ import annotations

import torch
from torch import Tensor

RELATIVE_EIGENVALUE_FLOOR = 1e-12
"""Eigenvalues at or below this fraction of the largest one are treated as exactly zero."""


def validate_rank(rank: int, maximum: int, what: str) -> None:
    """Raise a ValueError unless ``1 ≤ rank ≤ maximum`` (and rank is a plain int)."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"{what} must be an int, got {type(rank).__name__}")
    if not 1 <= rank <= maximum:
        raise ValueError(f"{what} must be in [1, {maximum}], got {rank}")


def damped_sqrt(g: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """Symmetric square root of a damped second moment, and its Moore–Penrose pseudo-inverse.

    Why: an A³ objective ``E‖x W − x W̃‖²`` equals ``‖T (W − W̃)‖_F²`` for any ``T`` with ``TᵀT = E[xᵀx] = G``,
    so whitening with ``T`` turns a weighted low-rank problem into a plain SVD; ``T⁺`` maps the answer back.

    ``g`` is ``[..., n, n]`` (batched over leading dims), symmetric positive semi-definite. It is damped like GPTQ
    damps its Hessian: ``G + damping · mean(diag G) · I`` (per matrix of the batch). Computed in float64 with
    ``eigh``; eigenvalues ``≤ RELATIVE_EIGENVALUE_FLOOR · max`` (and negative round-off) are set to zero in *both*
    returned matrices, so ``T⁺`` is exactly the pseudo-inverse of ``T`` and a zero or rank-deficient ``g`` gives
    finite results (an all-zero ``g`` gives ``T = T⁺ = 0``).

    Returns ``(T, T⁺)``, both symmetric float64 ``[..., n, n]``, with ``T T = G_damped`` up to the dropped eigenvalues.
    """
    if g.ndim < 2 or g.shape[-1] != g.shape[-2]:
        raise ValueError(f"expected a square matrix (or a batch of them) [..., n, n], got shape {tuple(g.shape)}")
    if not damping >= 0.0:
        raise ValueError(f"damping must be ≥ 0, got {damping}")
    if not torch.isfinite(g).all():
        raise ValueError("second-moment matrix contains NaN or Inf")
    size = g.shape[-1]
    moment = g.to(torch.float64)
    moment = 0.5 * (moment + moment.mT)
    mean_diagonal = moment.diagonal(dim1=-2, dim2=-1).mean(dim=-1)
    identity = torch.eye(size, dtype=torch.float64, device=g.device)
    moment = moment + (damping * mean_diagonal)[..., None, None] * identity

    eigenvalues, eigenvectors = torch.linalg.eigh(moment)
    floor = RELATIVE_EIGENVALUE_FLOOR * eigenvalues.amax(dim=-1, keepdim=True).clamp_min(0.0)
    kept = eigenvalues > floor
    root = torch.where(kept, eigenvalues.clamp_min(0.0).sqrt(), torch.zeros_like(eigenvalues))
    inverse_root = torch.where(kept, 1.0 / torch.where(kept, root, torch.ones_like(root)), torch.zeros_like(root))

    sqrt_g = (eigenvectors * root[..., None, :]) @ eigenvectors.mT
    sqrt_g_pinv = (eigenvectors * inverse_root[..., None, :]) @ eigenvectors.mT
    return 0.5 * (sqrt_g + sqrt_g.mT), 0.5 * (sqrt_g_pinv + sqrt_g_pinv.mT)


def dropped_energy(singular_values: Tensor, rank: int) -> Tensor:
    """Sum of squared singular values beyond ``rank``: the optimal objective value of a rank-``rank`` truncation."""
    validate_rank(rank, singular_values.shape[-1], "rank")
    return singular_values[..., rank:].to(torch.float64).square().sum(dim=-1)
