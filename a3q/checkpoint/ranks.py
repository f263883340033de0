"""Checkpoints of a data-parallel run (:mod:`a3q.distributed`): what the ranks must agree on, and the inputs rank 0
must collect before it writes.

Rank 0 writes every checkpoint, exactly as one process does; the other ranks never write or remove anything. That
works because after each layer every rank holds the same layers and the same stage states (the statistics were
summed over the ranks before any layer changed, and :func:`a3q.distributed.check_identical` verifies the layers).
Two things differ between the ranks, and this module handles them:

* **the next layer's inputs**: each rank holds its own whole batches of the windows
  (:class:`a3q.distributed.WindowShares`). Rank 0 collects every rank's batches (:func:`gather_batches`) and saves
  all of them in the one-process order, so a checkpoint does not depend on the number of processes: a run resumed
  with another number of processes takes its own batches back out of it (``WindowShares.batches_of``);
* **when to checkpoint and whether to stop**: ``checkpoint_minutes`` reads rank 0's clock, and a signal may reach one
  rank only. :func:`agree` makes one decision for all ranks (one small all-reduce per layer), so every rank saves,
  and stops, after the same layer; a rank that stopped alone would leave the others waiting in a collective.
"""

from __future__ import annotations

import torch
from torch import Tensor

from a3q import distributed
from a3q.distributed import WindowShares

_SIGNALS = ("SIGINT", "SIGTERM")


def agree(due: bool, requested: str | None) -> tuple[bool, str | None]:
    """One decision for every rank: checkpoint now if rank 0 says it is due; stop if any rank was asked to (by
    SIGINT before SIGTERM). One process: as given."""
    if distributed.world_size() <= 1:
        return due, requested
    flags = torch.tensor([float(due and distributed.is_main())] + [float(requested == name) for name in _SIGNALS],
                         dtype=torch.float64)
    summed = distributed.all_reduce_sum(flags)
    stop = next((name for name, count in zip(_SIGNALS, summed[1:].tolist()) if count > 0), None)
    return bool(summed[0] > 0), stop


def _aliases(hidden: dict[str, list[Tensor]]) -> dict[str, str]:
    """Streams whose inputs are the very tensors of an earlier stream (by name order): sent and saved once.

    Which streams share their tensors follows from the stages of the pass, not from the data, so it is the same on
    every rank."""
    aliases: dict[str, str] = {}
    names = sorted(hidden)
    for position, name in enumerate(names):
        for earlier in names[:position]:
            if earlier not in aliases and len(hidden[name]) == len(hidden[earlier]) and all(
                    a is b for a, b in zip(hidden[name], hidden[earlier])):
                aliases[name] = earlier
                break
    return aliases


def gather_batches(hidden: dict[str, list[Tensor]], shares: WindowShares) -> dict[str, list[Tensor]]:
    """Every stream's inputs for ALL batches of the pass, in the one-process order, on rank 0 (point-to-point from
    each rank, batch by batch); on the other ranks an empty dict once they have sent theirs. One process: as is."""
    me = distributed.rank()
    if shares.world <= 1:
        return hidden
    mine = shares.batches_of(me)
    for name, batches in hidden.items():
        if len(batches) != mine.stop - mine.start:
            raise distributed.DistributedError(f"rank {me}: stream {name} holds {len(batches)} batch(es), the pass "
                                               f"gave this rank {mine.stop - mine.start}")
    aliases = _aliases(hidden)
    sent = [name for name in sorted(hidden) if name not in aliases]
    on_gpu = distributed.backend() == "nccl"
    if me != 0:
        for name in sent:
            for tensor in hidden[name]:
                torch.distributed.send(tensor.contiguous() if on_gpu else tensor.detach().cpu().contiguous(), dst=0)
        distributed.counters["collectives"] += 1
        return {}
    sizes = [min(shares.batch_size, shares.count - start) for start in range(0, shares.count, shares.batch_size)]
    gathered: dict[str, list[Tensor]] = {name: list(hidden[name]) for name in sent}
    for source in range(1, shares.world):
        for name in sent:
            reference = hidden[name][0]
            for index in range(shares.batches)[shares.batches_of(source)]:
                buffer = torch.empty((sizes[index], *reference.shape[1:]), dtype=reference.dtype,
                                     device=reference.device if on_gpu else "cpu")
                torch.distributed.recv(buffer, src=source)
                gathered[name].append(buffer.to(reference.device))
    for name, earlier in aliases.items():
        gathered[name] = gathered[earlier]
    distributed.counters["collectives"] += 1
    return gathered
