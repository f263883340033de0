"""a3q's quantized KV cache and how a model carries its setting.

The setting lives in ``model.generation_config.a3q_kv_cache`` (a plain dict: ``bits``, ``group_size``,
``residual``, ``key_axis``). Why there: it is saved with the model (``generation_config.json``), it follows the model
object through every stage that rebuilds the ModelGraph, and ``generate()`` reads its generation config anyway.
:func:`install` makes ``generate()`` build a :class:`QuantizedKVCache` from it when the caller passes no cache;
:func:`new_cache` gives the evaluator the same cache.
"""

from __future__ import annotations

import types
from typing import Any

from a3q.cache.quantized import (
    QuantizedKVCache,
    cache_settings,
    quantized_bytes_per_token,
)

__all__ = [
    "SETTINGS_KEY",
    "QuantizedKVCache",
    "cache_settings",
    "get_settings",
    "install",
    "new_cache",
    "quantized_bytes_per_token",
    "set_settings",
]

SETTINGS_KEY = "a3q_kv_cache"


def get_settings(model: Any) -> dict[str, Any] | None:
    """The model's quantized-cache setting, or None for a full-precision cache."""
    generation_config = getattr(model, "generation_config", None)
    settings = getattr(generation_config, SETTINGS_KEY, None) if generation_config is not None else None
    return dict(settings) if settings else None


def set_settings(model: Any, settings: dict[str, Any] | None) -> None:
    """Record ``settings`` (None: full precision) on the model and make ``generate()`` use it."""
    if model.generation_config is not None:
        setattr(model.generation_config, SETTINGS_KEY, cache_settings(settings) if settings else None)
        # a generation config marked as derived from the model config drops unknown keys when it is loaded
        model.generation_config._from_model_config = False
    install(model)


def new_cache(model: Any):
    """A fresh cache as the model's setting asks: :class:`QuantizedKVCache` or a plain ``DynamicCache``."""
    from transformers import DynamicCache

    settings = get_settings(model)
    if settings is None:
        return DynamicCache(config=model.config)
    return QuantizedKVCache(model.config.num_hidden_layers, **settings)


def install(model: Any) -> None:
    """Let ``generate()`` build the model's cache (idempotent; a no-op without a quantized setting).

    transformers picks caches by name from a fixed list, so a cache class of our own can only be supplied by the
    model: this wraps the instance's ``_prepare_cache_for_generation``. A cache passed by the caller, an explicit
    ``cache_implementation`` or ``use_cache=False`` still win.
    """
    if get_settings(model) is None or getattr(model, "_a3q_cache_installed", False):
        return
    original = type(model)._prepare_cache_for_generation

    def prepare(self, generation_config, model_kwargs, *args, **kwargs):
        settings = get_settings(self)
        if (
            settings is not None
            and model_kwargs.get("past_key_values") is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation is None
        ):
            model_kwargs["past_key_values"] = QuantizedKVCache(self.config.num_hidden_layers, **settings)
            return None
        return original(self, generation_config, model_kwargs, *args, **kwargs)

    model._prepare_cache_for_generation = types.MethodType(prepare, model)
    model._a3q_cache_installed = True
