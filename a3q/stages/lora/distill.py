"""Distillation losses for the ``lora`` stage: the student learns the teacher's next-token distribution.

The teacher is represented by its **top-k** tokens per position plus one **tail bucket**: at temperature ``T``
the teacher's probabilities ``p = softmax(z_t / T)`` are kept exactly for its ``k`` most likely tokens ``I``
(``log p_I``), and the rest of its mass, ``p_tail = 1 − Σ_I p_i``, is one extra outcome. These ``k + 1`` numbers
are a proper distribution (they sum to 1), so the loss is an exact KL divergence between two distributions over
``k + 1`` buckets, the student's being ``q_I`` and ``q_tail = Σ_{j ∉ I} q_j`` of ``q = softmax(z_s / T)``::

    KD = T² · [ Σ_{i ∈ I} p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail) ]

Why the tail bucket: without it, renormalising the top-k alone tells the student nothing about how much mass the
rest should get (it could put 30% there and still match the shape of the top-k); with it the loss is 0 exactly
when the student agrees with the teacher on every kept token and on the rest as a whole, and by the data-processing
inequality it never exceeds the full-vocabulary KL (it is that KL with the tail tokens merged). ``T²`` keeps the
gradient's size independent of ``T`` (Hinton et al., 2015). ``log q_tail`` is a log-sum-exp over the student's
logits with the kept tokens masked out: exact and stable also when the student is confident (``1 − Σ q_I`` would
cancel catastrophically in float32).

When ``k`` equals the vocabulary there is no tail: its bucket is left out (``p_tail`` is then 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from a3q.stages.lora.hidden import hidden_mse


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's top-k distribution for some predictions: ``indices`` (int64 or int32) and ``logprobs`` ``[...,
    k]`` (``log p_I`` at the temperature), ``tail`` ``[...]`` (``log p_tail``; ``-inf`` when nothing is left), and
    optionally its hidden states at ``distill_layers``."""

    indices: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor
    #: ``distill_layers``: the teacher's outputs of those layers, ``[..., L, P − 1, d]`` (:mod:`.hidden`)
    hidden: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> TeacherTargets:
        hidden = None if self.hidden is None else self.hidden.to(device)
        return TeacherTargets(self.indices.to(device), self.logprobs.to(device), self.tail.to(device), hidden)


def teacher_targets(logits: torch.Tensor, top_k: int, temperature: float) -> TeacherTargets:
    """The teacher's top-k bucket distribution from its full logits ``[..., V]`` (computed in float32 at least)."""
    scaled = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    values, indices = logp.topk(top_k, dim=-1)
    return TeacherTargets(indices, values, _rest_logsumexp(logp, indices))


def _rest_logsumexp(logp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``log Σ_{j ∉ indices} exp(logp_j)`` per position; ``-inf`` when ``indices`` covers the vocabulary."""
    if indices.shape[-1] >= logp.shape[-1]:
        return torch.full(logp.shape[:-1], float("-inf"), dtype=logp.dtype, device=logp.device)
    return logp.scatter(-1, indices, float("-inf")).logsumexp(dim=-1)


def kd_loss(student_logits: torch.Tensor, teacher: TeacherTargets, temperature: float,
            reduction: str = "sum") -> torch.Tensor:
    """``T² · KL(teacher ‖ student)`` over the ``k + 1`` buckets (module docstring) per prediction, summed or
    averaged over the predictions (``reduction``). ``student_logits`` ``[..., V]`` matches ``teacher``'s leading
    shape; the loss is computed in at least float32."""
    logits = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    logq = torch.log_softmax(logits / temperature, dim=-1)
    indices = teacher.indices.long()
    logp = teacher.logprobs.to(logq.dtype)
    per = (logp.exp() * (logp - logq.gather(-1, indices))).sum(-1)
    if indices.shape[-1] < logq.shape[-1]:  # the tail bucket; where the teacher left nothing there it adds 0
        tail = teacher.tail.to(logq.dtype)
        present = torch.isfinite(tail)
        safe_tail = tail.masked_fill(~present, 0.0)
        logq_tail = _rest_logsumexp(logq, indices)
        per = per + torch.where(present, safe_tail.exp() * (safe_tail - logq_tail), torch.zeros_like(per))
    per = per * temperature**2
    return per.sum() if reduction == "sum" else per.mean()


def lm_loss(student_logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of the next tokens ``targets`` (in at least float32)."""
    logits = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction=reduction)


@dataclass(frozen=True)
class Objective:
    """What one prediction costs: ``lm`` (next-token cross-entropy), ``kd`` (the KD loss above) or ``kd+lm``
    (``kd_weight · KD + (1 − kd_weight) · LM``, a convex mix so the scale stays that of either loss)."""

    loss: str = "lm"
    temperature: float = 1.0
    kd_weight: float = 0.5
    #: weight of the hidden-state MSE at ``distill_layers`` (:mod:`a3q.stages.lora.hidden`), when those are given
    distill_weight: float = 1.0

    @property
    def needs_teacher(self) -> bool:
        return self.loss != "lm"

    def summed(self, logits: torch.Tensor, batch: torch.Tensor, teacher: TeacherTargets | None,
               hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of every prediction of ``batch`` ``[B, P]`` summed (``logits`` ``[B, P, V]``: the ``P − 1``
        predictions are positions ``0 … P−2``; ``teacher`` holds those positions' targets). ``hidden``: the
        student's outputs of the ``distill_layers`` at those positions ``[B, L, P − 1, d]``, matched to the
        teacher's."""
        loss = self._logits_loss(logits, batch, teacher)
        if hidden is not None:
            if teacher is None or teacher.hidden is None:
                raise ValueError("distill_layers: the teacher's hidden states were not cached")
            loss = loss + self.distill_weight * hidden_mse(hidden, teacher.hidden)
        return loss

    def _logits_loss(self, logits: torch.Tensor, batch: torch.Tensor, teacher: TeacherTargets | None) -> torch.Tensor:
        predicted = logits[:, :-1]
        if self.loss == "lm":
            return lm_loss(predicted, batch[:, 1:])
        if teacher is None:
            raise ValueError(f"loss: {self.loss} needs the teacher's targets")
        distill = kd_loss(predicted, teacher, self.temperature)
        if self.loss == "kd":
            return distill
        return self.kd_weight * distill + (1.0 - self.kd_weight) * lm_loss(predicted, batch[:, 1:])
