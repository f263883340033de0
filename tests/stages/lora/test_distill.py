"""The distillation loss (:mod:`a3q.stages.lora.distill`) against a brute-force KL in float64.

The brute force builds both distributions over the ``k + 1`` buckets explicitly (the teacher's top-k tokens found
by sorting, the rest summed into one bucket with a 0/1 mask) and takes ``T² · Σ p (log p − log q)`` term by term;
the loss under test gathers, masks with ``-inf`` and uses log-sum-exp instead. Values and gradients must agree.
"""

from __future__ import annotations

import math

import pytest
import torch

from a3q.stages.lora.distill import Objective, TeacherTargets, kd_loss, lm_loss, teacher_targets


def brute_force_kd(student: torch.Tensor, teacher: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Σ over positions of T²·KL(teacher buckets ‖ student buckets), written out with explicit buckets."""
    total = torch.zeros((), dtype=torch.float64)
    for zs, zt in zip(student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])):
        p = torch.exp(zt / temperature) / torch.exp(zt / temperature).sum()
        q = torch.exp(zs / temperature) / torch.exp(zs / temperature).sum()
        kept = torch.argsort(p, descending=True)[:k]
        rest = torch.ones_like(p, dtype=torch.bool)
        rest[kept] = False
        p_buckets = torch.cat([p[kept], (p * rest).sum().reshape(1)])
        q_buckets = torch.cat([q[kept], (q * rest).sum().reshape(1)])
        terms = [pi * (torch.log(pi) - torch.log(qi)) for pi, qi in zip(p_buckets, q_buckets) if pi > 0]
        total = total + temperature**2 * sum(terms)
    return total


@pytest.mark.parametrize(("k", "temperature"), [(1, 1.0), (4, 1.0), (4, 2.0), (7, 0.5), (11, 1.5)])
def test_kd_loss_and_gradient_equal_the_brute_force_kl(k, temperature):
    generator = torch.Generator().manual_seed(k)
    student = (torch.randn(2, 3, 11, generator=generator, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(2, 3, 11, generator=generator, dtype=torch.float64) * 2
    targets = teacher_targets(teacher, k, temperature)
    assert targets.indices.shape == (2, 3, k) and targets.tail.shape == (2, 3)
    # the k + 1 buckets are a distribution
    total = targets.logprobs.exp().sum(-1) + targets.tail.exp()
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)

    loss = kd_loss(student, targets, temperature)
    expected = brute_force_kd(student, teacher, k, temperature)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(loss, student)
    (expected_grad,) = torch.autograd.grad(brute_force_kd(student, teacher, k, temperature), student)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(kd_loss(student, targets, temperature, reduction="mean"), expected / 6,
                               rtol=1e-12, atol=1e-14)


def test_bucketed_kl_never_exceeds_the_full_kl_and_equals_it_for_the_whole_vocabulary():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(5, 20, generator=generator, dtype=torch.float64)
    teacher = torch.randn(5, 20, generator=generator, dtype=torch.float64)
    full = torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                      log_target=True, reduction="sum")
    losses = [kd_loss(student, teacher_targets(teacher, k, 1.0), 1.0) for k in (1, 5, 10, 19, 20)]
    assert all(a <= b + 1e-12 for a, b in zip(losses, losses[1:]))  # merging fewer tokens keeps more of the KL
    assert losses[-1] <= full + 1e-12
    torch.testing.assert_close(losses[-1], full, rtol=1e-12, atol=0)  # k = V: no tail bucket, the full KL
    assert torch.isneginf(teacher_targets(teacher, 20, 1.0).tail).all()


@pytest.mark.parametrize("k", [3, 20])
def test_student_equal_to_teacher_gives_zero_loss_and_zero_gradient(k):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 20, generator=generator, dtype=torch.float64) * 3
    student = logits.clone().requires_grad_(True)
    loss = kd_loss(student, teacher_targets(logits, k, 2.0), 2.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert abs(float(loss.detach())) < 1e-13
    assert float(grad.abs().max()) < 1e-13


def test_a_teacher_without_tail_mass_adds_nothing_and_gives_finite_gradients():
    """A tail of exactly zero mass (``log p_tail = -inf``) must add 0, not ``0 · ∞ = nan``."""
    student = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    targets = TeacherTargets(torch.tensor([[0, 1]] * 3), torch.log(torch.tensor([[0.25, 0.75]] * 3,
                                                                                  dtype=torch.float64)),
                             torch.full((3,), float("-inf"), dtype=torch.float64))
    loss = kd_loss(student, targets, 1.0)
    (grad,) = torch.autograd.grad(loss, student)
    q = torch.softmax(student.detach(), -1)
    expected = (0.25 * (math.log(0.25) - torch.log(q[:, 0])) + 0.75 * (math.log(0.75) - torch.log(q[:, 1]))).sum()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=1e-14)
    assert torch.isfinite(grad).all()


def test_objectives_lm_kd_and_their_convex_mix():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 9, generator=generator, dtype=torch.float64)
    teacher_logits = torch.randn(2, 5, 9, generator=generator, dtype=torch.float64)
    batch = torch.randint(0, 9, (2, 5), generator=generator)
    targets = teacher_targets(teacher_logits[:, :-1], 3, 1.5)
    lm = Objective("lm").summed(logits, batch, None)
    brute_lm = -sum(torch.log_softmax(logits[b, t], -1)[batch[b, t + 1]] for b in range(2) for t in range(4))
    torch.testing.assert_close(lm, brute_lm, rtol=1e-12, atol=0)
    torch.testing.assert_close(lm, lm_loss(logits[:, :-1], batch[:, 1:]), rtol=0, atol=0)
    kd = Objective("kd", temperature=1.5).summed(logits, batch, targets)
    torch.testing.assert_close(kd, brute_force_kd(logits[:, :-1], teacher_logits[:, :-1], 3, 1.5),
                               rtol=1e-12, atol=1e-14)
    mixed = Objective("kd+lm", temperature=1.5, kd_weight=0.3).summed(logits, batch, targets)
    torch.testing.assert_close(mixed, 0.3 * kd + 0.7 * lm, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="needs the teacher"):
        Objective("kd").summed(logits, batch, None)


def test_hidden_state_mse_is_summed_over_positions_and_averaged_over_layers_and_width():
    from a3q.stages.lora.hidden import hidden_mse

    generator = torch.Generator().manual_seed(3)
    student = torch.randn(2, 3, 5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 5, 4, generator=generator, dtype=torch.float64)
    brute = sum(float(((student.detach()[b, :, p] - teacher[b, :, p]) ** 2).sum()) / (3 * 4)
                for b in range(2) for p in range(5))
    assert float(hidden_mse(student, teacher).detach()) == pytest.approx(brute, rel=1e-12)
    same = teacher.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(hidden_mse(same, teacher), same)
    assert float(grad.abs().max()) == 0.0
    targets = TeacherTargets(torch.zeros(2, 5, 1, dtype=torch.long), torch.zeros(2, 5, 1, dtype=torch.float64),
                             torch.full((2, 5), float("-inf"), dtype=torch.float64), teacher)
    logits = torch.zeros(2, 6, 1, dtype=torch.float64)  # one token: the kd part is 0
    total = Objective("kd", distill_weight=2.5).summed(logits, torch.zeros(2, 6, dtype=torch.long), targets, student)
    assert float(total.detach()) == pytest.approx(2.5 * brute, rel=1e-12)
