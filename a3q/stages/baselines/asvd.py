"""Stage ``asvd``: activation-aware SVD (Yuan et al., 2023, arXiv 2312.05821).

Scale input channel i by ``s_i = E|x_i|^α`` before the SVD, so channels that carry large activations
are approximated better: ``W S = U Σ Vᵀ`` and ``W̃ = U_k Σ_k V_kᵀ S⁻¹``. It is a diagonal stand-in for
the full whitening of SVD-LLM.

```yaml
- stage: asvd
  ratio: 0.2
  alpha: 0.5   # exponent of the mean absolute activation
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

SCALE_FLOOR = 1e-6
"""Scales below this fraction of the largest are raised to it, so ``S⁻¹`` stays finite for dead channels."""


class ASVDConfig(BaselineConfig):
    """Activation-aware SVD: ``alpha`` is the exponent of ``E|x|``."""

    alpha: float = Field(0.5, ge=0.0, le=2.0)


def asvd_factors(weight: Tensor, statistics: InputStatistics, rank: int, alpha: float = 0.5) -> tuple[Tensor, Tensor]:
    """``W S ≈ B A'`` by truncated SVD, then ``A = A' S⁻¹``."""
    scale = statistics.mean_abs.to(weight).pow(alpha)
    scale = scale.clamp_min(SCALE_FLOOR * float(scale.max().clamp_min(1e-300)))
    u, s, vh = torch.linalg.svd(weight * scale[None, :], full_matrices=False)
    first, second = split_singular(u, s, vh, rank)
    return first / scale[None, :], second


@register_stage("asvd", ASVDConfig)
class ASVDStage(BaselineStage):
    needs = "mean_abs"

    def factorize(self, weight: Tensor, statistics: InputStatistics | None, rank: int) -> tuple[Tensor, Tensor]:
        return asvd_factors(weight, statistics, rank, alpha=self.config.alpha)
