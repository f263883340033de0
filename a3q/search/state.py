"""The search's checkpoint: ``search-state.json``, rewritten atomically after every finished step.

It holds the validated space (a resumed search must be the same search), the proxy scores (computed once), the
shared A³ artifacts built so far and every finished candidate's point. Plain JSON: no pickle, nothing executable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from a3q.atomic import write_json_atomic
from a3q.io.json_file import JSONFileError, read_json_file

FORMAT = 1


class SearchRefused(ValueError):
    """The output folder and ``--resume`` do not fit together; the message says what to do."""

MAX_STATE_BYTES = 64 << 20


@dataclass
class SearchState:
    """What a search has finished; see the module docstring."""

    path: Path
    space: dict[str, Any]
    proxy: dict[str, float] | None = None
    proxy_seconds: float = 0.0
    a3_artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    points: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, space: dict[str, Any], resume: bool) -> SearchState:
        """A fresh state, or (``resume``) the one in ``path``. Refused with a one-line reason: a folder that already
        holds a search without ``resume``, ``resume`` with nothing to resume, or a different space."""
        if not path.exists():
            if resume:
                raise SearchRefused(f"--resume: '{path.parent}' holds no search to resume ({path.name} is missing); "
                                  "run without --resume")
            return cls(path, space)
        if not resume:
            raise SearchRefused(f"--out: '{path.parent}' already holds a search; pass --resume to continue it, or "
                                "choose another folder")
        try:
            saved = read_json_file(path, MAX_STATE_BYTES)
        except (OSError, JSONFileError) as exc:
            raise SearchRefused(f"--resume: cannot read '{path}': {exc}") from None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise SearchRefused(f"--resume: '{path}' is not a search state of format {FORMAT}")
        if _comparable(saved.get("space")) != _comparable(space):
            raise SearchRefused(f"--resume: the space file differs from the one '{path.parent}' was searched with "
                                "(beyond evaluate_top); resume with the same file, or search into another folder")
        return cls(path, space, proxy=saved.get("proxy"), proxy_seconds=float(saved.get("proxy_seconds", 0.0)),
                   a3_artifacts=dict(saved.get("a3_artifacts") or {}), points=dict(saved.get("points") or {}))

    def save(self) -> None:
        write_json_atomic(self.path, {"format": FORMAT, "space": self.space, "proxy": self.proxy,
                                      "proxy_seconds": self.proxy_seconds, "a3_artifacts": self.a3_artifacts,
                                      "points": self.points})


def _comparable(space: Any) -> Any:
    """A space as resuming compares it: ``evaluate_top`` may grow (or shrink) between runs, since the proxy scores
    and the finished points stay valid; anything else changes what was measured."""
    return {k: v for k, v in space.items() if k != "evaluate_top"} if isinstance(space, dict) else space
