"""Stage ``svd``: plain truncated SVD of every decoder linear (the data-free baseline).

Eckart–Young gives the best rank-k approximation of ``W`` in Frobenius norm, but the model's error is
``‖X (W − W̃)ᵀ‖``: input channels with large activations matter more than the weight norm says, which
is why plain SVD degrades fast (and why ASVD / SVD-LLM / A³ use the data).

```yaml
- stage: svd
  ratio: 0.2   # fraction of decoder linear weights removed
```
"""

from __future__ import annotations

import torch
from torch import Tensor

from a3q.registry import register_stage
from a3q.stages.baselines.common import (
    BaselineConfig,
    BaselineStage,
    InputStatistics,
    split_singular,
)


class SVDConfig(BaselineConfig):
    """Truncated SVD; no calibration data is used."""

    needs_calibration = False


def svd_factors(weight: Tensor, statistics: InputStatistics | None, rank: int) -> tuple[Tensor, Tensor]:
    """``W ≈ (U_k √Σ_k)(√Σ_k V_kᵀ)``."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    return split_singular(u, s, vh, rank)


@register_stage("svd", SVDConfig)
class SVDStage(BaselineStage):
    needs = None

    def factorize(self, weight: Tensor, statistics: InputStatistics | None, rank: int) -> tuple[Tensor, Tensor]:
        return svd_factors(weight, statistics, rank)
