"""Stage ``svd_llm``: truncation-aware data whitening (SVD-LLM, Wang et al., 2024, arXiv 2403.07378).

With ``C = E[x xᵀ] = L Lᵀ`` (Cholesky), the model's error ``E‖x (W − W̃)ᵀ‖²`` equals
``‖(W − W̃) L‖_F²``, so truncating ``SVD(W L) = U Σ Vᵀ`` is optimal for the layer's output and each dropped
singular value costs exactly its square. Un-whitening gives ``A = Σ_k V_kᵀ L⁻¹`` (solved, never inverted).
SVD-LLM's LoRA update after truncation is not included (a3q's LoRA stage is the place for it).

```yaml
- stage: svd_llm
  ratio: 0.2
  damping: 1.0e-6   # δ·mean(diag C)·I added before the Cholesky (raised ×10 until it succeeds)
```
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from a3q.registry import register_stage
from a3q.stages.baselines.common import (
    BaselineConfig,
    BaselineStage,
    InputStatistics,
    split_singular,
)


class SVDLLMConfig(BaselineConfig):
    """Whitened SVD; ``damping`` keeps the Cholesky defined for rank-deficient statistics."""

    damping: float = Field(1e-6, ge=0.0, le=1.0)


def whitening_factor(moment: Tensor, damping: float) -> Tensor:
    """Lower-triangular ``L`` with ``L Lᵀ = C + δ·mean(diag C)·I``; δ grows ×10 until C is positive definite."""
    moment = 0.5 * (moment + moment.T)
    scale = float(moment.diagonal().mean().clamp_min(1e-300))
    identity = torch.eye(moment.shape[0], dtype=moment.dtype, device=moment.device)
    delta = damping
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(moment + delta * scale * identity)
        if int(info) == 0:
            return factor
        delta = max(delta * 10, 1e-10)
    raise ValueError("input second moment is not positive definite even with heavy damping")


def svd_llm_factors(weight: Tensor, statistics: InputStatistics, rank: int, damping: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``SVD(W L)`` truncated, then ``A = A' L⁻¹`` (a triangular solve)."""
    lower = whitening_factor(statistics.second_moment.to(weight), damping)
    u, s, vh = torch.linalg.svd(weight @ lower, full_matrices=False)
    first, second = split_singular(u, s, vh, rank)
    # first · L⁻¹  ⇔  solve X L = first
    return torch.linalg.solve_triangular(lower, first, upper=False, left=False), second


@register_stage("svd_llm", SVDLLMConfig)
class SVDLLMStage(BaselineStage):
    needs = "second_moment"

    def factorize(self, weight: Tensor, statistics: InputStatistics | None, rank: int) -> tuple[Tensor, Tensor]:
        return svd_llm_factors(weight, statistics, rank, damping=self.config.damping)
