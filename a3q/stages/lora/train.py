"""The LoRA training loop: AdamW on the adapter weights, on random windows of the training text, with the stage's
loss (:class:`a3q.stages.lora.distill.Objective`: next-token cross-entropy, distillation from cached teacher
targets, or a mix).

Deterministic for a fixed seed on CPU: the adapter initialisation, the window order and dropout all draw from
torch's global generator seeded with ``seed`` inside :func:`torch.random.fork_rng` (so the caller's random state is
left as it was), and the pool of windows is :func:`a3q.calib.windows.random_windows` with the same seed.

Schedule: linear warm-up over the first 5% of steps (at least one), then cosine decay to 10% of ``lr``; gradients
are clipped to norm 1. When ``steps × batch_size`` exceeds the windows the split holds, the pool is reused in a
fresh permutation per pass.

Data-parallel (``--nproc N``): ``batch_size`` is the global batch; every rank draws the same step order and trains
on its share of each step under DDP (:mod:`a3q.stages.lora.data_parallel`), which gives the one-process training
up to float summation order. The logged loss is the global batch's mean on every rank.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from a3q import distributed
from a3q.calib.sources import TextSourceFields
from a3q.calib.tokens import count_tokens
from a3q.calib.windows import random_windows
from a3q.stages.lora.data_parallel import batch_problem, data_parallel, global_sum, rank_loss_scale, rank_share
from a3q.stages.lora.distill import Objective
from a3q.stages.lora.hidden import captured_layers, stacked
from a3q.stages.lora.teacher import TeacherCache
from a3q.stages.lora.training_state import Progress, TrainingCheckpoint


@dataclass
class TrainResult:
    """What a training run did: per-step losses, tokens seen and wall time."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    windows: int = 0

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 10% of steps (at least one): the end of a noisy curve, smoothed a little."""
        tail = max(1, len(self.losses) // 10)
        return sum(self.losses[-tail:]) / tail

    def curve(self, points: int = 50) -> list[float]:
        """The loss curve averaged into at most ``points`` consecutive chunks, for the report."""
        size = max(1, math.ceil(len(self.losses) / points))
        return [sum(chunk) / len(chunk) for chunk in (self.losses[i : i + size] for i in range(0, len(self.losses), size))]


def training_windows(tokenizer, source: TextSourceFields, seq_len: int, wanted: int, seed: int) -> torch.Tensor:
    """``min(wanted, available)`` distinct windows of the text source, chosen with the seed."""
    source = source.source()
    available = count_tokens(tokenizer, source) // seq_len
    return random_windows(tokenizer, source, seq_len, min(wanted, available), seed)


def batch_order(pool_size: int, steps: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``[steps, batch_size]`` indices into the pool: one permutation per pass over it."""
    needed = steps * batch_size
    passes = [torch.randperm(pool_size, generator=generator) for _ in range(math.ceil(needed / pool_size))]
    return torch.cat(passes)[:needed].view(steps, batch_size)


def rank_rows(order: torch.Tensor) -> torch.Tensor:
    """The pool rows this rank trains on over all steps of ``order`` ``[steps, batch_size]`` (its shares), sorted:
    what its teacher cache must cover. One process: every row the steps use."""
    return torch.unique(torch.cat([rank_share(indices) for indices in order]))


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of every next token in ``batch``: the mean, or the sum (``reduction``). Logits in at least
    float32 (a float64 model keeps float64, which the data-parallel test uses to separate maths from rounding)."""
    logits = model(input_ids=batch, use_cache=False).logits
    logits = logits[:, :-1].flatten(0, 1)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), batch[:, 1:].flatten(),
                           reduction=reduction)


def _schedule(step: int, steps: int) -> float:
    warmup = max(1, round(0.05 * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    model: torch.nn.Module,
    parameters: Iterable[torch.nn.Parameter],
    pool: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    description: str = "lora",
    progress: bool = True,
    objective: Objective = Objective(),
    teacher: TeacherCache | None = None,
    layers: tuple[torch.nn.Module, str, list[int]] | None = None,
    checkpoint: TrainingCheckpoint | None = None,
) -> TrainResult:
    """Train ``parameters`` (the adapter's) for ``steps`` AdamW steps on batches of ``batch_size`` drawn from ``pool``.

    Call inside a seeded :func:`torch.random.fork_rng` for a reproducible run (dropout uses the global generator).
    In a distributed run every rank calls this with the same ``pool`` and ``generator`` seed; ``batch_size`` is
    the global batch, each rank trains on its share of it and DDP averages the gradients. ``objective`` is the
    loss of one prediction; a distilling one reads its targets from ``teacher`` (covering this rank's rows).
    ``layers``: ``(causal LM, family, indices)`` whose decoder layers' outputs are matched to the teacher's
    (``distill_layers``). ``checkpoint``: save the training state every few steps and start from a saved one
    (:mod:`a3q.stages.lora.training_state`; a resumed run equals an uninterrupted one).
    """
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        raise ValueError("no trainable parameters: the adapter matched no module")
    if objective.needs_teacher and teacher is None:
        raise ValueError(f"loss: {objective.loss} needs the teacher's cached targets")
    problem = batch_problem(batch_size, distributed.world_size())
    if problem:
        raise distributed.DistributedError(problem)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _schedule(step, steps))
    order = batch_order(pool.shape[0], steps, batch_size, generator)  # the same on every rank
    predictions_per_window = pool.shape[1] - 1
    scale = rank_loss_scale(batch_size, predictions_per_window)
    device = next(model.parameters()).device
    result = TrainResult(windows=int(pool.shape[0]))
    done = checkpoint.restore(parameters, optimizer, scheduler) if checkpoint is not None else None
    if done is not None:
        result.losses, result.tokens, result.seconds = done.losses, done.tokens, done.seconds
    was_training = model.training
    model.train()
    started = time.perf_counter() - result.seconds
    bar = tqdm(order[result.steps :], desc=description, unit="step", disable=not progress, leave=False,
               initial=result.steps, total=steps)
    try:
        with data_parallel(model) as forward, captured_layers(*(layers or (model, "", None))) as captured:
            for indices in bar:
                rows = rank_share(indices)
                batch = pool[rows].to(device)  # this rank's share of the global batch
                targets = teacher.for_rows(rows).to(device) if objective.needs_teacher else None
                logits = forward(input_ids=batch, use_cache=False).logits
                hidden = stacked(captured, layers[2]) if layers else None
                summed = objective.summed(logits, batch, targets, hidden)
                del logits
                loss = float(global_sum(summed)) / (batch_size * predictions_per_window)  # the global batch's mean
                if not math.isfinite(loss):  # the same value on every rank: all of them stop together
                    raise FloatingPointError(f"training loss became {loss} at step {result.steps + 1}; lower lr")
                (summed * scale).backward()  # DDP averages the ranks' gradients into the global mean's
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                result.losses.append(loss)
                result.tokens += batch_size * int(pool.shape[1])
                bar.set_postfix(loss=f"{loss:.4f}")
                if checkpoint is not None and checkpoint.due(result.steps, steps):
                    checkpoint.save(parameters, optimizer, scheduler, Progress(
                        result.steps, result.losses, result.tokens, time.perf_counter() - started))
    finally:
        bar.close()
        model.train(was_training)
    result.seconds = time.perf_counter() - started
    return result
