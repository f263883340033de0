"""Data-parallel calibration on ``torch.distributed``: one process per rank, launched by ``torchrun``.

``torchrun --nproc-per-node N -m a3q.cli run RECIPE --out DIR`` (or ``a3q run RECIPE --nproc N``, which calls
:func:`launch`) starts N processes; each loads the model, cuts the same calibration windows (same seed) and observes
only its share of them (:func:`shard`): whole batches of the one-process run (:class:`WindowShares`, the one rule
for every split), so every rank runs exactly the one-process run's GEMMs. Before a layer is changed, every stage's
statistics are summed across ranks (:meth:`~a3q.pipeline.stage.CalibratingStage.reduce_statistics`, called by
:mod:`a3q.pipeline.runner` with :func:`all_reduce_sum`): the sums and token counts, never averages, so every rank then
holds exactly the statistics of all windows and computes the same decomposition. :func:`check_identical` verifies
that after each layer. With one process (no ``WORLD_SIZE`` > 1 in the environment) every function here is a no-op.

Backend: gloo on CPU, nccl when the run's device is a GPU (``device: auto`` → ``cuda:LOCAL_RANK``). Every collective
has a timeout (``A3Q_COLLECTIVE_TIMEOUT_S``, default 1800 s), so a rank that hangs ends the run with an error instead
of a silent wait; a rank that dies is reported by torchrun's elastic agent, which stops the others.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: environment variable: seconds a collective (and the process-group rendezvous) may wait before failing
TIMEOUT_ENV = "A3Q_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0

#: what this process reduced so far (for the report and the benchmark): collectives and bytes
counters: dict[str, int] = {"collectives": 0, "bytes_reduced": 0, "layer_checks": 0, "layer_repairs": 0}
_started_here = False


class DistributedError(RuntimeError):
    """A distributed run cannot go on (too few windows for the ranks, ranks that disagree)."""


def env_world_size() -> int:
    """The world size torchrun announced in the environment (1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def collective_timeout() -> datetime.timedelta:
    """The collective timeout: ``A3Q_COLLECTIVE_TIMEOUT_S`` seconds (default 30 minutes)."""
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise DistributedError(f"{TIMEOUT_ENV} must be positive, got {raw}")
    return datetime.timedelta(seconds=seconds)


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes reports, checkpoints and artifacts."""
    return rank() == 0


def rank_device(device: str | None) -> str | None:
    """The device this rank runs on: ``auto``/``cuda`` → ``cuda:LOCAL_RANK`` in a multi-process run with GPUs."""
    if env_world_size() > 1 and device in (None, "auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank()}"
    return device


def init(device: str | torch.device | None = None) -> bool:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1); True if this call did.

    gloo for a CPU run, nccl for a GPU run (the rank's GPU becomes the current device). Idempotent: an already
    initialized group (e.g. by the caller) is used as is.
    """
    global _started_here
    if is_initialized() or env_world_size() <= 1:
        return False
    gpu = torch.device(device).type == "cuda" if device not in (None, "auto") else torch.cuda.is_available()
    backend = "nccl" if gpu and torch.distributed.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    torch.distributed.init_process_group(backend=backend, timeout=collective_timeout())
    _started_here = True
    for key in counters:
        counters[key] = 0
    return True


def destroy() -> None:
    """Leave the process group, if :func:`init` joined it."""
    global _started_here
    if _started_here and is_initialized():
        torch.distributed.destroy_process_group()
    _started_here = False


def backend() -> str | None:
    return torch.distributed.get_backend() if is_initialized() else None


def _comm_device() -> torch.device:
    """Where the backend wants tensors: the current GPU for nccl, the CPU for gloo."""
    if backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The element-wise sum of ``tensor`` over every rank (a new tensor on ``tensor``'s device; one process: as is).

    One collective. Integer and float64 tensors are summed exactly as their dtype allows (float64 counts are exact
    below 2⁵³).
    """
    if world_size() <= 1:
        return tensor
    device = _comm_device()
    buffer = tensor.detach().to(device, copy=True).contiguous()
    torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
    counters["collectives"] += 1
    counters["bytes_reduced"] += buffer.numel() * buffer.element_size()
    return buffer.to(tensor.device)


def reduce_together(tensors: Sequence[Tensor], reduce: Callable[[Tensor], Tensor]) -> list[Tensor]:
    """``reduce`` applied to every tensor of ``tensors`` in ONE call: flattened into one float64 buffer and split back
    (each result in its tensor's shape, dtype and device). Float64 holds token counts exactly (below 2⁵³)."""
    if not tensors:
        return []
    device = tensors[0].device
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])
    summed = reduce(flat)
    out, offset = [], 0
    for tensor in tensors:
        part = summed[offset : offset + tensor.numel()].reshape(tensor.shape)
        out.append(part.to(device=tensor.device, dtype=tensor.dtype))
        offset += tensor.numel()
    return out


@dataclass(frozen=True)
class WindowShares:
    """How ``count`` windows are shared by ``world`` processes: the one rule of every split in a3q (the calibration
    pass, its checkpoints, evaluation, LoRA's global batch; ``batch_size=1`` splits as ``torch.tensor_split``).

    The windows are cut into the batches one process runs (``[0, b)``, ``[b, 2b)``…) and the batches are split
    contiguously, the first ``batches % world`` ranks getting one more (a rank may get none). Whole batches, because a
    CPU GEMM's float32 result depends on the batch shape: each rank then runs exactly the one-process run's GEMMs,
    and GPTQ, which turns last-bit differences into other codes, agrees with one process.
    """

    count: int
    batch_size: int = 1
    world: int = 1

    @property
    def batches(self) -> int:
        return -(-self.count // self.batch_size)

    def batches_of(self, rank: int) -> slice:
        """Rank ``rank``'s batches among all batches, in the one-process order."""
        per_rank, extra = divmod(self.batches, self.world)
        first = rank * per_rank + min(rank, extra)
        return slice(first, first + per_rank + (1 if rank < extra else 0))

    def windows_of(self, rank: int) -> slice:
        """Rank ``rank``'s windows: batching them from their start gives the one-process run's batches."""
        batches = self.batches_of(rank)
        return slice(min(batches.start * self.batch_size, self.count), min(batches.stop * self.batch_size, self.count))

    def problem(self) -> str | None:
        """Why some rank would get no whole batch (every rank of a calibration pass needs one), or None."""
        if self.batches >= self.world:
            return None
        return (f"{self.count} window(s) in batches of {self.batch_size} make {self.batches} batch(es), too few for "
                f"{self.world} processes (every process needs a whole batch): set calibration.windows ≥ "
                f"{(self.world - 1) * self.batch_size + 1}, a smaller batch_size, or at most --nproc "
                f"{max(1, self.batches)}")


def shard(windows: Tensor, batch_size: int = 1) -> Tensor:
    """This process's contiguous share of ``windows`` ([n, seq_len]) in whole batches of ``batch_size``
    (:class:`WindowShares`); one process: every window. Raises :class:`DistributedError` when a rank would get none."""
    if world_size() <= 1:
        return windows
    shares = WindowShares(windows.shape[0], batch_size, world_size())
    if shares.problem():
        raise DistributedError(f"calibration: {shares.problem()}")
    return windows[shares.windows_of(rank())]


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` as rank ``src`` has it, on every rank (any picklable object; one process: as is)."""
    if world_size() <= 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=src, device=_comm_device() if backend() == "nccl" else None)
    return box[0]


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s values."""
    if world_size() <= 1:
        return tensor
    device = _comm_device()
    buffer = tensor.detach().to(device, copy=True).contiguous()
    torch.distributed.broadcast(buffer, src=src)
    tensor.data.copy_(buffer.to(tensor.device))
    return tensor


def _equal_everywhere(values: Tensor) -> Tensor:
    """Element-wise: did every rank pass the same value? (max and min over ranks agree: exact; one collective)."""
    both = torch.cat([values, -values]).to(_comm_device())
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    counters["collectives"] += 1
    half = values.numel()
    return (both[:half] == -both[half:]).cpu()


def _checksum(tensors: dict[str, Tensor]) -> Tensor:
    """Per tensor: its numel, plain sum and a position-weighted sum, in float64 (a cheap fingerprint that changes
    when any value or shape differs, except by a vanishing coincidence)."""
    values = []
    for name in sorted(tensors):
        tensor = tensors[name].detach().reshape(-1).to(torch.float64)
        weights = torch.arange(1, tensor.numel() + 1, dtype=torch.float64, device=tensor.device).remainder_(977).add_(1)
        values += [float(tensor.numel()), float(tensor.sum()), float((tensor * weights).sum())]
    return torch.tensor(values, dtype=torch.float64)


def check_identical(module: torch.nn.Module, what: str) -> bool:
    """After a layer was changed: do all ranks hold the same ``module``? One small all-reduce of a checksum.

    The decomposition is deterministic given the (identically reduced) statistics, so on one machine type ranks
    agree bit for bit and nothing else is sent. Should they ever differ in values (e.g. a non-deterministic GPU
    kernel), rank 0's tensors are broadcast so the ranks go on with one model (counted in ``layer_repairs``); if they
    differ in structure (names or shapes), the run fails naming ``what``. Returns True when a repair was needed.
    """
    if world_size() <= 1:
        return False
    counters["layer_checks"] += 1
    tensors = dict(module.state_dict())
    shapes = [(name, tuple(tensors[name].shape), str(tensors[name].dtype)) for name in sorted(tensors)]
    fingerprint = _structure_fingerprint(shapes)
    equal = _equal_everywhere(torch.cat([fingerprint, _checksum(tensors)]))
    if not equal[: fingerprint.numel()].all():
        raise DistributedError(f"{what}: the ranks hold layers of different shapes (rank {rank()}: {shapes[:4]}…)")
    if equal.all():
        return False
    for name in sorted(tensors):
        broadcast_(tensors[name], src=0)
    counters["layer_repairs"] += 1
    return True


def _structure_fingerprint(shapes: list[tuple[str, tuple[int, ...], str]]) -> Tensor:
    """Names, shapes and dtypes as a float64 vector that is identical across processes (no salted ``hash``)."""
    digest = hashlib.sha256(repr(shapes).encode()).digest()
    return torch.tensor([int.from_bytes(digest[i : i + 6], "big") for i in range(0, 30, 6)], dtype=torch.float64)


def check_same_everywhere(tensor: Tensor, what: str) -> None:
    """Fail unless every rank holds the same ``tensor`` (e.g. the calibration windows cut from the same text)."""
    if world_size() <= 1:
        return
    if not _equal_everywhere(_checksum({"t": tensor})).all():
        raise DistributedError(f"{what} differ between ranks (rank {rank()}): every rank must read the same text "
                               "with the same seed")


def summary() -> dict[str, Any]:
    """The report's ``distributed`` entry."""
    return {"world_size": world_size(), "backend": backend(), **counters}


def launch(nproc: int, args: list[str], module: bool = True, extra: list[str] | None = None) -> None:
    """Start ``nproc`` processes on this machine with ``torch.distributed.run`` (torchrun's own entry point).

    ``args``: the module (``module=True``, e.g. ``["a3q.cli", "run", ...]``) or script and its arguments. Raises
    torch's ``ChildFailedError`` (naming every failed rank, its exit code and error) when a rank fails; the elastic
    agent then stops the other ranks.
    """
    from torch.distributed import run as torchrun

    options = ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "--monitor-interval=0.5",
               *(extra or [])]
    torchrun.main([*options, *(["-m"] if module else []), *args])


def failed_ranks(error: BaseException) -> str:
    """``rank 1 (exit code 2)`` … from torchrun's ``ChildFailedError``; the message otherwise."""
    failures = getattr(error, "failures", None)
    if not failures:
        return str(error)
    # keyed by global rank (a ProcessFailure itself knows only its local_rank)
    return ", ".join(f"rank {rank} (exit code {failure.exitcode})" for rank, failure in sorted(failures.items()))
