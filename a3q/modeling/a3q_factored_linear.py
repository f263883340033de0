"""Two-factor linears ``W ≈ B A`` of the low-rank baselines, rebuilt from ``config.a3q_factorized`` (torch only).

This file is self-contained on purpose: a3q copies it into every artifact of its own model classes, whose
constructors call :func:`replace_with_factored_linears`, so a process without a3q (``trust_remote_code=True``) builds
the factored modules before the weights load, instead of dense linears with random weights.
"""

from __future__ import annotations

from torch import Tensor, nn


class LowRankLinear(nn.Module):
    """``W ≈ B A`` as two ``nn.Linear``: ``first`` (in → rank, no bias) then ``second`` (rank → out, W's bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype=None, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.second = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    @property
    def weight(self) -> Tensor:
        """The dense product ``B A`` (for inspection and tests; the forward never builds it)."""
        return self.second.weight @ self.first.weight

    @classmethod
    def like(cls, linear: nn.Module, rank: int) -> "LowRankLinear":
        """An uninitialised replacement for ``linear`` with the same shape, dtype and device."""
        weight = linear.weight
        bias = getattr(linear, "bias", None) is not None
        return cls(linear.in_features, linear.out_features, rank, bias, weight.dtype, weight.device)


def replace_with_factored_linears(model: nn.Module, factored: dict) -> None:
    """Swap each linear named in ``factored`` (module path → rank) for an empty :class:`LowRankLinear` of that rank.

    Idempotent: a module that already is a LowRankLinear of the recorded rank is left as it is.
    """
    for path, rank in factored.items():
        module = model.get_submodule(path)
        if isinstance(module, LowRankLinear) and module.rank == int(rank):
            continue
        model.set_submodule(path, LowRankLinear.like(module, int(rank)))
