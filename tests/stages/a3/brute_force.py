"""Brute force for the closed forms: a direct float64 optimisation to compare each optimum against."""

from __future__ import annotations

import torch

F64 = torch.float64


def fit_by_lbfgs(loss, shapes: list[tuple[int, ...]], seed: int) -> float:
    """Minimise ``loss`` over factors of the given shapes from a random start (float64 L-BFGS)."""
    generator = torch.Generator().manual_seed(seed)
    params = [(0.5 * torch.randn(shape, generator=generator, dtype=F64)).requires_grad_() for shape in shapes]
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=1000, history_size=50, tolerance_grad=1e-13,
                                  tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss(*params)
        value.backward()
        return value

    optimizer.step(closure)
    with torch.no_grad():
        return loss(*params).item()
