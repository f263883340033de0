"""A³ for the value–output product: shrink the v/o head dimension while preserving each head's output.

Row-vector convention: head j's contribution to the layer output is ``o_j W_o,j`` with ``o_j = A_j v`` and
``W_o,j`` the ``[head_dim, d_model]`` row-convention slice (HF ``o_proj.weight[:, j*d:(j+1)*d].T``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .linalg import damped_sqrt, dropped_energy, validate_rank


@dataclass(frozen=True, eq=False)
class OVSolution:
    """Compressed value ``v @ a_v`` and new output weights: head j contributes ``(A_j v a_v) @ b_o[j]``."""

    a_v: Tensor  # [head_dim, vo_rank]
    b_o: Tensor  # [group_size, vo_rank, d_model]
    singular_values: Tensor  # [min(head_dim, group_size*d_model)], descending

    def dropped_energy(self, vo_rank: int) -> Tensor:
        """Mean squared output error ``E‖o W_o − o a_v b_o‖²`` (summed over the group's heads) at ``vo_rank``."""
        return dropped_energy(self.singular_values, vo_rank)


def ov_svd(g: Tensor, w_o: Tensor, vo_rank: int, damping: float) -> OVSolution:
    """Optimal rank-``vo_rank`` factorisation of the value–output map of one (group of) head(s).

    Minimises ``Σ_j E‖o W_o,j − o a_v b_o[j]‖²`` where ``g = E[oᵀ o]`` (``[head_dim, head_dim]``) and
    ``w_o`` is ``[group_size, head_dim, d_model]``. With ``TᵀT = g`` this is ``‖T [W_o,1 … W_o,g] − T a_v B‖²``,
    solved by ``SVD(T [W_o,1 … W_o,g]) = U Σ Vᵀ``: ``a_v = T⁺ U_r`` and ``b_o[j] = U_rᵀ T W_o,j``.
    MHA (paper Thm 2): ``group_size = 1`` and ``g = E[o_i o_iᵀ]`` (head i's slice of o_proj's input).
    GQA: ``g = E[v vᵀ]`` of the shared value head (the paper's value-input statistic).
    The error at rank r is ``Σ_{i>r} σ_i²`` (exact with ``damping = 0``).
    """
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"g must be [head_dim, head_dim], got shape {tuple(g.shape)}")
    head_dim = g.shape[0]
    if w_o.ndim != 3 or w_o.shape[1] != head_dim:
        raise ValueError(f"w_o must be [group_size, {head_dim}, d_model], got shape {tuple(w_o.shape)}")
    group_size, _, d_model = w_o.shape
    validate_rank(vo_rank, min(head_dim, group_size * d_model), "vo_rank")
    if not torch.isfinite(w_o).all():
        raise ValueError("w_o contains NaN or Inf")

    sqrt_g, sqrt_g_pinv = damped_sqrt(g, damping)
    w_o64 = w_o.to(device=g.device, dtype=torch.float64)
    whitened = sqrt_g @ w_o64.permute(1, 0, 2).reshape(head_dim, group_size * d_model)  # T [W_o,1 … W_o,g]
    # SVD of the tall transpose: same factors, 2-3x faster than the wide [d, g·d_model] matrix
    _, singular_values, left_t = torch.linalg.svd(whitened.mT, full_matrices=False)
    left = left_t.mT

    left_kept = left[:, :vo_rank]
    a_v = sqrt_g_pinv @ left_kept
    b_o = left_kept.mT @ sqrt_g @ w_o64  # broadcasts over the group: [group_size, vo_rank, d_model]
    return OVSolution(a_v=a_v, b_o=b_o, singular_values=singular_values)
