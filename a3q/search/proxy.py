"""STUB until helper B's proxy lands: the proxy's interface, scoring by the bits a candidate keeps.

The real module computes one statistics pass on the dense model that serves every candidate
(``collect_proxy_statistics``) and scores each candidate as an estimated KL in nats per token (``proxy_score``,
lower is better). This stub keeps the same two calls so the driver is final; its score only orders candidates by
how much they keep (A³ ratio removed, bits per weight), which is NOT a quality estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from a3q.search.candidate import Candidate

#: stored bits per weight of each quantizer setting, for the stub's ordering
_STUB_BITS = {"nf4": 4.0, "fp4": 4.0, "int8": 8.0}


@dataclass
class ProxyStatistics:
    """What the proxy measured once on the dense model (the stub measures nothing)."""

    windows: int


def collect_proxy_statistics(graph: Any, windows: Any, candidates: list[Candidate], progress: bool = True
                             ) -> ProxyStatistics:
    """One statistics pass for every candidate (stub: nothing to collect)."""
    return ProxyStatistics(windows=int(windows.shape[0]))


def proxy_score(stats: ProxyStatistics, candidate: Candidate) -> float:
    """Stub: ``a3_ratio + 2^-bits``, lower is better (float weights count as 16 bits)."""
    bits = 16.0
    if candidate.weights is not None:
        fields = dict(candidate.weights)
        stage = fields["stage"]
        bits = float(fields.get("bits", 4)) if stage == "gptq" else _STUB_BITS[fields.get("quant_type", "nf4")]
    return candidate.a3_ratio + 2.0 ** -bits
