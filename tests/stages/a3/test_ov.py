"""OV: SVD of the whitened output weights, checked against brute force on the data and the paper's Thm 2.

MHA: the statistic is G_o = E[o oᵀ] of the head's attention output o = A X W_v (A random row-stochastic).
GQA: the statistic is G_v = E[v vᵀ] of the shared value head (the paper's value-input statistic); the objective it
is exact for is Σ_j ‖V W_o,j − V a_v b_o[j]‖², i.e. the MHA objective with A = I, which is what the GQA cases use.
"""

from dataclasses import dataclass

import pytest
import torch

from a3q.stages.a3.ov import ov_svd
from tests.stages.a3.brute_force import fit_by_lbfgs

TOKENS, D_MODEL, HEAD_DIM, VO_RANK = 200, 12, 6, 3
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny float64 problems: one intra-op thread avoids OpenMP contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class OVProblem:
    mixed_inputs: torch.Tensor  # P = A X: [tokens, d_model]
    w_v: torch.Tensor  # [d_model, head_dim]
    w_o: torch.Tensor  # [group_size, head_dim, d_model]

    @property
    def values(self) -> torch.Tensor:  # P W_v: [tokens, head_dim]
        return self.mixed_inputs @ self.w_v

    @property
    def statistic(self) -> torch.Tensor:
        return self.values.T @ self.values / self.values.shape[0]


def make_problem(kind: str, tokens: int = TOKENS, seed: int = 0) -> OVProblem:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, D_MODEL, generator=generator, dtype=F64)
    w_v = torch.randn(D_MODEL, HEAD_DIM, generator=generator, dtype=F64)
    group_size = 1 if kind == "mha" else 3
    w_o = torch.randn(group_size, HEAD_DIM, D_MODEL, generator=generator, dtype=F64)
    if kind == "gqa":
        return OVProblem(x, w_v, w_o)
    logits = 3.0 * torch.randn(tokens, tokens, generator=generator, dtype=F64)
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    attention = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)  # random row-stochastic A
    return OVProblem(attention @ x, w_v, w_o)


def output_error(problem: OVProblem, a_v: torch.Tensor, b_o: torch.Tensor, best_scale: bool = False) -> torch.Tensor:
    """Σ_j ‖P W_v W_o,j − P W_v a_v b_o[j]‖_F², optionally with the best scalar multiple of the approximation."""
    exact = problem.values @ problem.w_o
    approx = (problem.values @ a_v) @ b_o
    if best_scale:
        approx = approx * (exact * approx).sum() / approx.square().sum()
    return (exact - approx).square().sum()


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_svd_beats_random_and_perturbed_candidates(kind: str) -> None:
    problem = make_problem(kind)
    solution = ov_svd(problem.statistic, problem.w_o, VO_RANK, damping=0.0)
    optimum = output_error(problem, solution.a_v, solution.b_o).item()
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):  # random rank-r candidates, each with its best overall scale
        a_v = torch.randn(solution.a_v.shape, generator=generator, dtype=F64)
        b_o = torch.randn(solution.b_o.shape, generator=generator, dtype=F64)
        assert output_error(problem, a_v, b_o, best_scale=True).item() >= optimum
    for _ in range(200):  # small perturbations of the optimum
        a_v = solution.a_v + 1e-2 * solution.a_v.std() * torch.randn(solution.a_v.shape, generator=generator, dtype=F64)
        b_o = solution.b_o + 1e-2 * solution.b_o.std() * torch.randn(solution.b_o.shape, generator=generator, dtype=F64)
        assert output_error(problem, a_v, b_o).item() >= optimum * (1 - 1e-12)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_svd_matches_gradient_descent(kind: str) -> None:
    problem = make_problem(kind)
    solution = ov_svd(problem.statistic, problem.w_o, VO_RANK, damping=0.0)
    norm = (problem.values @ problem.w_o).square().sum()
    optimum = (output_error(problem, solution.a_v, solution.b_o) / norm).item()
    descended = min(
        fit_by_lbfgs(lambda a_v, b_o: output_error(problem, a_v, b_o) / norm,
                     [tuple(solution.a_v.shape), tuple(solution.b_o.shape)], seed)
        for seed in range(2)
    )
    assert optimum <= descended * (1 + 1e-6)
    assert descended <= optimum * (1 + 1e-5), "gradient descent should reach the same optimum (benign landscape)"


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_error_equals_dropped_singular_values_at_every_rank(kind: str) -> None:
    problem = make_problem(kind)
    scale = (problem.values @ problem.w_o).square().sum()
    for vo_rank in range(1, HEAD_DIM + 1):
        solution = ov_svd(problem.statistic, problem.w_o, vo_rank, damping=0.0)
        assert solution.singular_values.shape == (HEAD_DIM,)
        assert (solution.singular_values.diff() <= 0).all()
        error = output_error(problem, solution.a_v, solution.b_o)
        tail = TOKENS * solution.dropped_energy(vo_rank)
        torch.testing.assert_close(error / scale, tail / scale, rtol=1e-10, atol=1e-13)


def symmetric_power(matrix: torch.Tensor, power: float) -> torch.Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues**power) @ eigenvectors.T


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_head_space_equals_paper_dm_space_formula(kind: str) -> None:
    """Paper Thm 2: SVD(R_p^{1/2} W_v [W_o,1 … W_o,g]) with the d_model×d_model statistic R_p = PᵀP/l."""
    problem = make_problem(kind)
    r_p = problem.mixed_inputs.T @ problem.mixed_inputs / TOKENS
    assert torch.linalg.cond(r_p) < 1e4, "test needs well-conditioned statistics"
    w_o_concatenated = torch.cat(list(problem.w_o), dim=1)  # [head_dim, group_size * d_model]
    u, s, vh = torch.linalg.svd(symmetric_power(r_p, 0.5) @ problem.w_v @ w_o_concatenated, full_matrices=False)
    assert s[VO_RANK - 1] / s[VO_RANK] > 1.01, "test needs a gap at the truncation rank"
    paper = symmetric_power(r_p, -0.5) @ u[:, :VO_RANK] * s[:VO_RANK] @ vh[:VO_RANK]
    solution = ov_svd(problem.statistic, problem.w_o, VO_RANK, damping=0.0)
    ours = torch.cat(list(problem.w_v @ solution.a_v @ solution.b_o), dim=1)
    assert (ours - paper).norm() <= 1e-8 * paper.norm()


@pytest.mark.parametrize("tokens", [TOKENS, 4])
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_full_rank_reproduces_outputs(kind: str, tokens: int) -> None:
    problem = make_problem(kind, tokens=tokens)
    solution = ov_svd(problem.statistic, problem.w_o, HEAD_DIM, damping=0.0)
    exact = problem.values @ problem.w_o
    approx = problem.values @ solution.a_v @ solution.b_o
    assert (approx - exact).norm() <= 1e-10 * exact.norm()


@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_zero_and_rank_deficient_statistics_stay_finite(damping: float) -> None:
    problem = make_problem("gqa", tokens=4)  # 4 tokens < head_dim 6
    solution = ov_svd(problem.statistic, problem.w_o, VO_RANK, damping=damping)
    for tensor in (solution.a_v, solution.b_o, solution.singular_values):
        assert torch.isfinite(tensor).all()
    dead_head = ov_svd(torch.zeros(HEAD_DIM, HEAD_DIM), problem.w_o, VO_RANK, damping=damping)  # outputs all zero
    assert torch.equal(dead_head.a_v, torch.zeros_like(dead_head.a_v))
    assert torch.equal(dead_head.b_o, torch.zeros_like(dead_head.b_o))


def test_rejects_bad_rank_and_shapes() -> None:
    problem = make_problem("gqa")
    for bad_rank in (0, HEAD_DIM + 1):
        with pytest.raises(ValueError, match="vo_rank"):
            ov_svd(problem.statistic, problem.w_o, bad_rank, damping=0.0)
    with pytest.raises(ValueError, match="w_o"):
        ov_svd(problem.statistic, problem.w_o[0], VO_RANK, damping=0.0)
    with pytest.raises(ValueError, match="g must be"):
        ov_svd(problem.statistic[:, :4], problem.w_o, VO_RANK, damping=0.0)
