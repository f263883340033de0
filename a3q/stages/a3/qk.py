"""A³ for the query–key product: shrink the q/k head dimension while preserving pre-softmax scores.

NoPE attention: a joint SVD over the query heads of one KV group (paper Thm 1 for one head).
RoPE attention: keep whole rotation-frequency pairs chosen by a diagonal (CUR) score.
Row-vector convention throughout: a query is ``q = x W_q`` and a score is ``q kᵀ``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .linalg import damped_sqrt, dropped_energy, validate_rank


@dataclass(frozen=True, eq=False)
class QKSolution:
    """Output-space transforms of one KV group: compressed query ``q_j @ a_q[j]``, compressed key ``k @ a_k``."""

    a_q: Tensor  # [group_size, head_dim, qk_rank]
    a_k: Tensor  # [head_dim, qk_rank]
    singular_values: Tensor  # [head_dim], descending: all of them, so any rank's error is known

    def dropped_energy(self, qk_rank: int) -> Tensor:
        """Mean squared score error ``E_{q,k}[(q kᵀ − q a_q a_kᵀ kᵀ)²]`` (summed over heads) at ``qk_rank``."""
        return dropped_energy(self.singular_values, qk_rank)


def qk_svd(g_q: Tensor, g_k: Tensor, qk_rank: int, damping: float) -> QKSolution:
    """Optimal rank-``qk_rank`` factorisation of the scores of one KV group of NoPE attention.

    Minimises ``Σ_j E_{q_j, k}[(q_j kᵀ − q_j a_q[j] a_kᵀ kᵀ)²]`` over token pairs, where ``g_q[j] = E[q_jᵀ q_j]``
    (``[group_size, head_dim, head_dim]``, one per query head sharing the key) and ``g_k = E[kᵀ k]``.
    With ``TᵀT = G`` that is ``‖[T_q,1; …; T_q,g] (I − a_q a_kᵀ) T_k‖²``: an Eckart–Young problem solved by
    ``SVD([T_q,1; …; T_q,g] T_k) = U Σ Vᵀ``, ``a_q[j] = T_q,j⁺ U^(j)_r``, ``a_k = T_k⁺ V_r Σ_r``.
    ``group_size = 1`` is multi-head attention. The error at rank r is ``Σ_{i>r} σ_i²`` (exact with ``damping = 0``).
    """
    if g_q.ndim != 3 or g_q.shape[-1] != g_q.shape[-2]:
        raise ValueError(f"g_q must be [group_size, head_dim, head_dim], got shape {tuple(g_q.shape)}")
    group_size, head_dim, _ = g_q.shape
    if g_k.shape != (head_dim, head_dim):
        raise ValueError(f"g_k must be [{head_dim}, {head_dim}] to match g_q, got shape {tuple(g_k.shape)}")
    validate_rank(qk_rank, head_dim, "qk_rank")

    sqrt_g_q, sqrt_g_q_pinv = damped_sqrt(g_q, damping)
    sqrt_g_k, sqrt_g_k_pinv = damped_sqrt(g_k, damping)
    stacked = (sqrt_g_q @ sqrt_g_k).reshape(group_size * head_dim, head_dim)  # T_k symmetric: T_kᵀ = T_k
    left, singular_values, right_t = torch.linalg.svd(stacked, full_matrices=False)

    left_kept = left[:, :qk_rank].reshape(group_size, head_dim, qk_rank)
    a_q = sqrt_g_q_pinv @ left_kept
    a_k = sqrt_g_k_pinv @ (right_t[:qk_rank].mT * singular_values[:qk_rank])
    return QKSolution(a_q=a_q, a_k=a_k, singular_values=singular_values)


def rope_pair_scores(g_q_diag: Tensor, g_k_diag: Tensor) -> Tensor:
    """Importance of each RoPE frequency pair of a KV group, from diagonal second moments (CUR score).

    Why: dropping coordinate c removes ``q_c k_c`` terms from every score; ignoring correlations, their energy is
    ``λ_c = (Σ_j E[q_j,c²]) · E[k_c²]``. RoPE rotates coordinates in pairs, so pairs are kept or dropped whole:
    pair p (HF ``rotate_half`` layout: partners ``p`` and ``p + head_dim/2``) scores ``λ_p + λ_{p+head_dim/2}``.
    ``g_q_diag`` is ``[group_size, head_dim]`` (pre-RoPE ``E[q²]`` per query head), ``g_k_diag`` is ``[head_dim]``.
    """
    if g_q_diag.ndim != 2:
        raise ValueError(f"g_q_diag must be [group_size, head_dim], got shape {tuple(g_q_diag.shape)}")
    head_dim = g_q_diag.shape[1]
    if g_k_diag.shape != (head_dim,):
        raise ValueError(f"g_k_diag must be [{head_dim}] to match g_q_diag, got shape {tuple(g_k_diag.shape)}")
    if head_dim % 2:
        raise ValueError(f"RoPE head_dim must be even, got {head_dim}")
    coordinate_scores = g_q_diag.to(torch.float64).sum(dim=0) * g_k_diag.to(torch.float64)
    half = head_dim // 2
    return coordinate_scores[:half] + coordinate_scores[half:]


def select_rope_pairs(scores: Tensor, qk_rank: int) -> Tensor:
    """Indices (ascending) of the ``qk_rank/2`` highest-scoring frequency pairs; ties go to the lower index.

    Why: keeping the pairs with the largest score drops the least (diagonal) score energy. ``qk_rank`` counts
    coordinates, so it must be even.
    """
    if scores.ndim != 1:
        raise ValueError(f"scores must be [head_dim/2], got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("pair scores contain NaN or Inf")
    validate_rank(qk_rank, 2 * scores.shape[0], "qk_rank")
    if qk_rank % 2:
        raise ValueError(f"qk_rank must be even with RoPE (pairs are kept whole), got {qk_rank}")
    order = torch.argsort(scores.to(torch.float64), descending=True, stable=True)
    return order[: qk_rank // 2].sort().values


def pair_coordinates(pairs: Tensor, head_dim: int) -> Tensor:
    """Head coordinates of kept pairs, in the compressed layout: kept first-half coordinates, then their partners.

    Why: with this order the compressed head is again in ``rotate_half`` layout, so kept coordinate i and its
    partner ``i + qk_rank/2`` rotate together with the pair's original frequency.
    """
    if head_dim % 2 or head_dim < 2:
        raise ValueError(f"RoPE head_dim must be a positive even number, got {head_dim}")
    if pairs.ndim != 1 or pairs.dtype != torch.long:
        raise ValueError(f"pairs must be a 1-D LongTensor, got shape {tuple(pairs.shape)} dtype {pairs.dtype}")
    half = head_dim // 2
    if pairs.numel() and (int(pairs.min()) < 0 or int(pairs.max()) >= half):
        raise ValueError(f"pair indices must lie in [0, {half}), got {pairs.tolist()}")
    return torch.cat([pairs, pairs + half])
