"""Mid-training checkpoints of the ``lora`` stage: a stopped run resumes training where it was, bit for bit.

The engine checkpoints between stages; a training stage is one long step of its own, and a stop an hour into
it would otherwise lose the hour. Every ``checkpoint_steps`` steps (and only at a step's end, where everything
is consistent) the loop writes, in one safetensors file in the run's ``lora-state/`` folder:

* the adapter's trainable tensors, by position in the parameter list (the names are recorded and checked);
* AdamW's state (``step``, ``exp_avg``, ``exp_avg_sq`` per tensor) and its parameter groups (the current lr);
* the scheduler's state (where the warm-up/cosine schedule is);
* torch's global random state (dropout draws from it) and the losses, tokens and seconds so far.

The batch order needs nothing: it is drawn up front from the seed, and a resumed loop skips the steps done. The
file is keyed like the teacher cache: by the stage's settings, its training windows and a fingerprint of the base
model it trains (a state from another base or another recipe is never applied; it is ignored and replaced). The
file is written atomically (:func:`a3q.atomic.write_safetensors_atomic`); no pickle is read. The stage removes it
when training ends: the engine's checkpoint after the stage takes over from there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from a3q.atomic import write_safetensors_atomic

STATE_FORMAT = "a3q-lora-state-1"
#: one element in this many of each base tensor enters the fingerprint, with the tensor's sum: a changed model
#: changes them (A³ or quantization rewrite whole tensors), at a fraction of hashing every byte
FINGERPRINT_STRIDE = 4099


def base_fingerprint(model: torch.nn.Module) -> str:
    """A digest of the frozen base the adapter trains on: names, shapes, dtypes, each tensor's sum and a strided
    sample of its values."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        wide = torch.float64 if tensor.is_floating_point() else torch.int64  # exact for every stored dtype
        sample = tensor.detach().reshape(-1)[::FINGERPRINT_STRIDE].to("cpu", wide)
        total = torch.sum(tensor.detach(), dtype=wide)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{float(total).hex()}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def state_key(settings: dict[str, Any], pool: torch.Tensor, fingerprint: str, rank: int, world: int) -> str:
    """What a saved state must match to be resumed: the stage's settings, windows, base model and process share."""
    digest = hashlib.sha256()
    head = {"format": STATE_FORMAT, "settings": settings, "rank": rank, "world": world, "base": fingerprint,
            "pool": list(pool.shape)}
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    digest.update(pool.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Progress:
    """What the loop has done so far (restored with the state)."""

    steps: int = 0
    losses: list[float] | None = None
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class TrainingCheckpoint:
    """Where and how often one training run saves itself; ``every`` 0 turns saving off."""

    path: Path
    key: str
    every: int
    names: Sequence[str]

    def due(self, step: int, steps: int) -> bool:
        """After ``step`` steps: save now? (Not after the last one: the stage's result is then the checkpoint.)"""
        return self.every > 0 and step % self.every == 0 and step < steps

    def save(self, parameters: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
             scheduler: Any, progress: Progress) -> None:
        tensors: dict[str, torch.Tensor] = {f"param.{i}": p.detach().to("cpu").clone() for i, p in enumerate(parameters)}
        optimizer_state = optimizer.state_dict()
        for index, values in optimizer_state["state"].items():
            for name, value in values.items():
                tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().to("cpu").clone()
        tensors["rng"] = torch.get_rng_state()
        scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        metadata = {"format": STATE_FORMAT, "key": self.key, "names": json.dumps(list(self.names)),
                    "param_groups": json.dumps(optimizer_state["param_groups"]),
                    "scheduler": json.dumps(scheduler_state),
                    "progress": json.dumps({"steps": progress.steps, "losses": progress.losses,
                                            "tokens": progress.tokens, "seconds": progress.seconds})}
        write_safetensors_atomic(self.path, tensors, metadata)

    def restore(self, parameters: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                scheduler: Any) -> Progress | None:
        """Load a matching saved state into the adapter, optimizer, scheduler and RNG; None when there is none
        (missing, damaged, or another run's: then training starts from step 0)."""
        loaded = self._read()
        if loaded is None:
            return None
        tensors, metadata = loaded
        with torch.no_grad():
            for i, parameter in enumerate(parameters):
                parameter.copy_(tensors[f"param.{i}"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            if name.startswith("optimizer."):
                _, index, field = name.split(".", 2)
                state.setdefault(int(index), {})[field] = tensor
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
        scheduler.load_state_dict({**json.loads(metadata["scheduler"]), "lr_lambdas": [None] * len(optimizer.param_groups)})
        torch.set_rng_state(tensors["rng"])
        done = json.loads(metadata["progress"])
        return Progress(int(done["steps"]), [float(x) for x in done["losses"]], int(done["tokens"]),
                        float(done["seconds"]))

    def _read(self) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            if metadata.get("format") != STATE_FORMAT or metadata.get("key") != self.key or \
                    json.loads(metadata.get("names", "null")) != list(self.names):
                return None
            return load_file(str(self.path)), metadata
        except (OSError, SafetensorError, ValueError, KeyError):
            return None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def training_checkpoint(folder: Path, name: str, every: int, settings: dict[str, Any], pool: torch.Tensor,
                        model: torch.nn.Module, named: Callable[[], Sequence[tuple[str, torch.nn.Parameter]]],
                        rank: int, world: int) -> TrainingCheckpoint:
    """The checkpoint of one training run: ``folder/name-KEY.safetensors`` (see the module docstring)."""
    key = state_key(settings, pool, base_fingerprint(model), rank, world)
    names = [n for n, p in named() if p.requires_grad]
    return TrainingCheckpoint(folder / f"{name}-{key[:24]}.safetensors", key, every, names)
