"""The artifact check in vLLM's per-architecture config hook.

``ModelConfig`` calls ``MODELS_CONFIG_MAP[arch].verify_and_update_model_config`` while it is built, in the process
that parses the model (the front end: ``LLM(...)`` or ``vllm serve``), before any engine process is started. The
check hashes every file once per process and artifact state (cached on path, sizes and modification times).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from a3q.serving.checks import check_servable, kv_cache_setting

logger = logging.getLogger("vllm.a3q")  # a child of vLLM's logger: printed with its handlers and format

_VERIFIED: set[tuple] = set()


def _state(folder: Path) -> tuple:
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()))


def verify_once(folder: str | os.PathLike) -> None:
    """:func:`check_servable` with every hash, unless this process already checked the folder as it is now."""
    folder = Path(folder)
    key = (str(folder.resolve()), _state(folder)) if folder.is_dir() else (str(folder),)
    if key in _VERIFIED:
        return
    check_servable(folder)
    _VERIFIED.add(key)
    logger.info("a3q: %s matches its manifest (sizes and SHA-256 of every file)", folder)
    setting = kv_cache_setting(folder)
    if setting:
        logger.warning("a3q: %s asks for a3q's quantized KV cache (%s); vLLM keeps its own cache (kv_cache_dtype, "
                       "default: the model dtype), which is not the same quantizer: see docs/serving.md", folder,
                       setting)


class A3ServeCheck(VerifyAndUpdateConfig):
    """Refuse (one line) an artifact that does not match its manifest or that the plugin does not serve."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        verify_once(model_config.model)
