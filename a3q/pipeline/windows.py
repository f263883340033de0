"""The recipe's calibration windows, cut once per run and shared by every pipeline pass."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from a3q import distributed
from a3q.calib.windows import random_windows

if TYPE_CHECKING:
    from a3q.recipe import CalibrationConfig


class CalibrationWindows:
    """Cut on first use, with the model's tokenizer, then kept for the run.

    Every process of a data-parallel run cuts the same windows (same text, same seed; checked across processes).
    The pipeline gives each process its share (:func:`a3q.distributed.shard`); global allocation's probes use them
    unsharded. Whether every process gets a whole batch is checked before the model loads
    (:func:`a3q.engine.distributed_problems`).
    """

    def __init__(self, calibration: CalibrationConfig) -> None:
        self.calibration = calibration
        self._windows: Tensor | None = None

    def get(self, tokenizer: Any) -> Tensor:
        if self._windows is None:
            cal = self.calibration
            self._windows = random_windows(tokenizer, cal.source(), cal.seq_len, cal.windows, cal.seed)
            distributed.check_same_everywhere(self._windows, "the calibration windows")
        return self._windows
