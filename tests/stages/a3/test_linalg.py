"""damped_sqrt: a symmetric square root of a damped second moment and its pseudo-inverse."""

import pytest
import torch

from a3q.stages.a3.linalg import damped_sqrt, dropped_energy, validate_rank


def second_moment(tokens: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(tokens, size, generator=generator, dtype=torch.float64)
    return data.T @ data / tokens


def test_square_root_squares_to_damped_statistic() -> None:
    g = second_moment(200, 6, seed=0)
    damping = 0.01
    sqrt_g, sqrt_g_pinv = damped_sqrt(g, damping)
    expected = g + damping * g.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    assert sqrt_g.dtype == torch.float64
    torch.testing.assert_close(sqrt_g, sqrt_g.T, rtol=0, atol=0)
    torch.testing.assert_close(sqrt_g.T @ sqrt_g, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sqrt_g_pinv @ sqrt_g, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)


def test_batched_matches_one_by_one_and_float32_input_gives_float64() -> None:
    batch = torch.stack([second_moment(50, 5, seed=seed) for seed in range(3)]).float()
    sqrt_g, sqrt_g_pinv = damped_sqrt(batch, 1e-3)
    assert sqrt_g.shape == (3, 5, 5) and sqrt_g.dtype == torch.float64
    for index in range(3):
        single, single_pinv = damped_sqrt(batch[index], 1e-3)
        torch.testing.assert_close(sqrt_g[index], single, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sqrt_g_pinv[index], single_pinv, rtol=1e-12, atol=1e-12)


def test_rank_deficient_statistic_gives_moore_penrose_pair() -> None:
    g = second_moment(3, 6, seed=1)  # 3 tokens, 6 dims: rank 3
    sqrt_g, sqrt_g_pinv = damped_sqrt(g, 0.0)
    assert torch.isfinite(sqrt_g).all() and torch.isfinite(sqrt_g_pinv).all()
    torch.testing.assert_close(sqrt_g @ sqrt_g, g, rtol=0, atol=1e-12)
    torch.testing.assert_close(sqrt_g @ sqrt_g_pinv @ sqrt_g, sqrt_g, rtol=0, atol=1e-12)
    torch.testing.assert_close(sqrt_g_pinv @ sqrt_g @ sqrt_g_pinv, sqrt_g_pinv, rtol=0, atol=1e-10)
    assert torch.linalg.matrix_rank(sqrt_g_pinv).item() == 3


@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_zero_statistic_gives_zeros_not_nan(damping: float) -> None:
    sqrt_g, sqrt_g_pinv = damped_sqrt(torch.zeros(2, 4, 4), damping)
    assert torch.equal(sqrt_g, torch.zeros(2, 4, 4, dtype=torch.float64))
    assert torch.equal(sqrt_g_pinv, torch.zeros(2, 4, 4, dtype=torch.float64))


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="square"):
        damped_sqrt(torch.zeros(3, 4), 0.0)
    with pytest.raises(ValueError, match="damping"):
        damped_sqrt(torch.eye(3), -1.0)
    with pytest.raises(ValueError, match="NaN"):
        damped_sqrt(torch.full((3, 3), float("nan")), 0.0)
    for bad_rank in (0, 7, 2.0, True):
        with pytest.raises(ValueError, match="rank"):
            validate_rank(bad_rank, 6, "rank")


def test_dropped_energy_is_tail_of_squared_singular_values() -> None:
    singular_values = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    assert dropped_energy(singular_values, 1).item() == 5.0
    assert dropped_energy(singular_values, 3).item() == 0.0
