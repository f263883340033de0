"""LoRA training under ``torch.nn.parallel.DistributedDataParallel`` (a run launched with ``--nproc N``/torchrun).

The recipe's ``batch_size`` is the **global** batch: every step, each rank trains on its contiguous share of the
step's windows (:func:`rank_share` of the step's indices, which every rank draws identically from the
seeded pool), so ``steps``, ``lr``, the schedule and the tokens a step sees mean the same with any number of
processes. DDP averages the ranks' gradients; :func:`rank_loss_scale` weights each rank's summed loss so that this
average is exactly the gradient of the global batch's mean loss, also when the batch does not divide evenly.

With one process every function here is the identity, so a one-process run trains exactly as before.

Only the adapter's parameters take part in DDP: the frozen base's parameters and every buffer are marked ignored,
so constructing DDP does not broadcast the whole model (hundreds of MB; every rank loaded the same weights anyway),
no buffer is synchronised before each forward, and quantized buffers (GPTQ codes, bitsandbytes states) never reach
a collective.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from a3q import distributed

#: marks torch's DDP leaves on a module, its parameters and buffers (removed after training, so nothing leaks into
#: deep copies or later stages)
_MODULE_MARK = "_ddp_params_and_buffers_to_ignore"
_TENSOR_MARK = "_ddp_ignored"


def batch_problem(batch_size: int, world: int) -> str | None:
    """Why ``batch_size`` (the global batch) cannot be split over ``world`` processes: every rank needs a window."""
    if batch_size >= world:
        return None
    return (f"batch_size: {batch_size} is the global batch and cannot be shared by {world} processes (every process "
            f"trains on at least one window per step); set batch_size ≥ {world} or run fewer processes")


def rank_share(indices: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous part of one step's window indices (:class:`a3q.distributed.WindowShares` in batches of
    one window: the first ``B % N`` ranks get one more). One process: all of them."""
    if distributed.world_size() <= 1:
        return indices
    return indices[distributed.WindowShares(len(indices), 1, distributed.world_size()).windows_of(distributed.rank())]


def rank_loss_scale(batch_size: int, predictions_per_window: int) -> float:
    """Factor for this rank's *summed* next-token loss so that DDP's gradient average is the global mean's gradient.

    DDP divides the sum of the ranks' gradients by the world size N; the global mean loss is Σ_ranks(sum) / P with
    P = batch_size × predictions per window. So each rank back-propagates ``sum × N / P``: an uneven split (3
    windows over 2 ranks) is then weighted by tokens, not averaged per rank. One process: ``1 / P`` (the mean).
    """
    return distributed.world_size() / (batch_size * predictions_per_window)


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` (detached) summed over the ranks, for the logged loss. A direct collective, deliberately not
    :func:`a3q.distributed.all_reduce_sum`: its counters describe the calibration's statistics for the report."""
    if distributed.world_size() <= 1:
        return value.detach()
    summed = value.detach().clone()
    torch.distributed.all_reduce(summed, op=torch.distributed.ReduceOp.SUM)
    return summed


def seed_dropout_for_rank(seed: int) -> None:
    """Give ranks > 0 their own dropout stream (rank 0 continues the one-process stream): with one seed everywhere
    every rank would draw the same masks for different windows."""
    if distributed.rank() > 0:
        torch.manual_seed((seed + distributed.rank() * 0x9E3779B97F4A7C15) % 2**64)


@contextmanager
def data_parallel(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` wrapped in DDP for the duration of training (one process: ``model`` itself).

    gloo on a CPU (no ``device_ids``), nccl with ``device_ids=[the model's GPU]``: the process group
    :func:`a3q.distributed.init` started. ``find_unused_parameters=False``: every adapter weight takes part in every
    forward, and the frozen base is ignored, not unused. Gradient checkpointing (non-reentrant, as the stage enables
    it) is compatible with that.
    """
    if distributed.world_size() <= 1:
        yield model
        return
    ignored = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    ignored += [name for name, _ in model.named_buffers()]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device = next(p for p in model.parameters() if p.requires_grad).device
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
        yield wrapped
    finally:
        _unmark(model)


def _unmark(model: torch.nn.Module) -> None:
    if hasattr(model, _MODULE_MARK):
        delattr(model, _MODULE_MARK)
    for tensor in [*model.parameters(), *model.buffers()]:
        if hasattr(tensor, _TENSOR_MARK):
            delattr(tensor, _TENSOR_MARK)


class _AdapterWeights(torch.nn.Module):
    """The trainable tensors of a model as one small module (``check_identical`` compares a module's state dict;
    comparing the whole model would checksum every frozen base weight in float64 too)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                self.register_parameter(name.replace(".", "__"), parameter)


def check_adapters_identical(model: torch.nn.Module, what: str) -> bool:
    """After training: do all ranks hold the same adapter? (DDP keeps them identical; this verifies it.) Rank 0's
    weights are broadcast if they ever differ; returns True in that case. One process: False."""
    return distributed.check_identical(_AdapterWeights(model), what)
