"""Report rows: what every stage did, measured the same way, as JSON and as a rich table.

``params`` counts the decoder's linear weights only (q/k/v/o and MLP projections); embeddings,
norms, biases and the LM head are excluded. ``kv_bytes_per_token`` is the KV cache one token
occupies across all layers at the cache's storage width.
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.table import Table


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark so each stage's peak is its own (Linux; no-op elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class StageMeasurement:
    """Time and peak memory of one block of work."""

    seconds: float = 0.0
    peak_rss_mb: float = 0.0


@contextmanager
def measure() -> Iterator[StageMeasurement]:
    """Measure wall time and peak RSS of the enclosed block."""
    result = StageMeasurement()
    _reset_peak_rss()
    start = time.perf_counter()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - start
        result.peak_rss_mb = peak_rss_mb()


@dataclass
class Report:
    """The rows of one run, in order; serialised as ``{"stages": [...]}`` plus context."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.context, "stages": self.rows}


def _format_params(value: Any) -> str:
    return f"{value / 1e6:.2f}M" if isinstance(value, (int, float)) else "-"


def _format_number(value: Any, digits: int) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) else "-"


def render_table(rows: list[dict[str, Any]], title: str = "a3q report") -> Table:
    """A rich table of report rows: one line per stage."""
    table = Table(title=title)
    for name, justify in [
        ("stage", "left"),
        ("seconds", "right"),
        ("peak RSS MiB", "right"),
        ("decoder linear params", "right"),
        ("KV bytes/token", "right"),
        ("perplexity", "right"),
        ("notes", "left"),
    ]:
        table.add_column(name, justify=justify)
    for row in rows:
        table.add_row(
            str(row.get("stage")),
            _format_number(row.get("seconds"), 1),
            _format_number(row.get("peak_rss_mb"), 0),
            _format_params(row.get("params")),
            _format_number(row.get("kv_bytes_per_token"), 0),
            _format_number(row.get("ppl"), 3),
            str(row.get("note", "")),
        )
    return table


def print_table(rows: list[dict[str, Any]], title: str = "a3q report", console: Console | None = None) -> None:
    (console or Console()).print(render_table(rows, title))
