"""One point of a search space: which stages, with which settings, a candidate recipe runs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Candidate:
    """A composition: A³ (ratio 0 = none), then at most one KV setting, then at most one weight quantizer.

    ``weights`` and ``kv`` are the stage's recipe fields as sorted (name, value) pairs, so a candidate is hashable
    and its recipe is exactly what it says, e.g. ``(("bits", 4), ("group_size", 64), ("stage", "gptq"))``.
    The KV stage comes before the weight quantizer because reducing KV ranks needs float weights (a recipe refuses
    the other order); a cache-bits-only KV stage is indifferent to the order.
    """

    a3_ratio: float = 0.0
    allocation: Literal["uniform", "global"] = "global"
    weights: tuple[tuple[str, Any], ...] | None = None
    kv: tuple[tuple[str, Any], ...] | None = None

    def stages(self) -> list[dict[str, Any]]:
        """The recipe stages, in order (no evaluate/export)."""
        out: list[dict[str, Any]] = []
        if self.a3_ratio > 0:
            out.append(self.a3_stage())
        for fields in (self.kv, self.weights):
            if fields is not None:
                out.append({name: _thawed(value) for name, value in fields})
        return out

    def a3_stage(self) -> dict[str, Any]:
        """The A³ stage alone (candidates that share it share one built A³ artifact)."""
        return {"stage": "a3", "ratio": self.a3_ratio, "allocation": self.allocation}

    @property
    def a3_key(self) -> str:
        """The key of the A³ part alone (``dense`` without A³)."""
        return f"a3-{self.a3_ratio:g}-{self.allocation}" if self.a3_ratio > 0 else "dense"

    @property
    def key(self) -> str:
        """A short, filesystem-safe, unique name, e.g. ``a3-0.2-global+gptq-b4-g64``."""
        parts = [self.a3_key]
        for fields in (self.weights, self.kv):
            if fields is not None:
                d = dict(fields)
                parts.append("-".join([str(d.pop("stage"))] + [f"{k}{v}" for k, v in sorted(d.items())]))
        return _SAFE.sub("", "+".join(parts).replace("_", ""))


#: what a key keeps: it names folders (runs/<key>), so no separators, quotes or brackets from list-valued fields
_SAFE = re.compile(r"[^A-Za-z0-9.+=-]")


def frozen(value: Any) -> Any:
    """A field value made hashable (lists become tuples, recursively), so a candidate can hold any stage field."""
    return tuple(frozen(item) for item in value) if isinstance(value, (list, tuple)) else value


def _thawed(value: Any) -> Any:
    """The recipe form of a frozen value (tuples back to lists: recipes are strict about list fields)."""
    return [_thawed(item) for item in value] if isinstance(value, tuple) else value
