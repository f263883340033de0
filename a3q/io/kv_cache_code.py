"""Ship the quantized KV cache inside an artifact, so ``generate()`` uses it under ``trust_remote_code=True``.

transformers builds generation caches from a fixed list of names, so a process without a3q only gets our cache if
the model class asks for it. The artifact therefore gets two small files: ``a3q_kv_cache.py`` (a copy of
:mod:`a3q.cache.quantized`, torch + transformers only) and ``modeling_a3q_kv.py``, a subclass of the model's class
whose ``_prepare_cache_for_generation`` builds that cache from ``generation_config.a3q_kv_cache``; ``auto_map``
points ``AutoModelForCausalLM`` at the subclass.

The generated file is filled from a fixed template with identifiers a3q itself chose and checked: the base class is
either a3q's own modeling class (from :func:`a3q.modeling.remote_code_entry`) or a class that transformers itself
exports. Nothing read from the input model's files (its ``config.json``'s ``auto_map``, say) reaches the code.
"""

from __future__ import annotations

import json
import keyword
import shutil
from pathlib import Path
from typing import Any

from a3q.arch.auto import is_a3_model, remote_code_entry
from a3q.cache import quantized

CACHE_FILE = "a3q_kv_cache.py"
MODELING_FILE = "modeling_a3q_kv.py"

_TEMPLATE = '''"""{cls} whose generate() uses a3q's quantized KV cache (written by a3q; see a3q_kv_cache.py)."""

{base_import}

from .a3q_kv_cache import QuantizedKVCache


class {cls}(_Base):
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        settings = getattr(generation_config, "a3q_kv_cache", None) or getattr(self.generation_config, "a3q_kv_cache", None)
        if (
            settings
            and model_kwargs.get("past_key_values") is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation is None
        ):
            model_kwargs["past_key_values"] = QuantizedKVCache(self.config.num_hidden_layers, **settings)
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
'''


def _identifier(name: str) -> str:
    if not (name.isidentifier() and name.isascii() and not keyword.iskeyword(name)):
        raise ValueError(f"refusing to generate code with {name!r}: not a plain Python identifier")
    return name


def _base_class_import(model: Any) -> tuple[str, str]:
    """``(import line, base class name)`` for the subclass, from identifiers a3q checked."""
    import transformers

    if is_a3_model(model):  # a3q's own class, shipped as remote code next to this file
        stem, base = remote_code_entry(model.config.model_type)
        return f"from .{_identifier(stem)} import {_identifier(base)} as _Base", base
    base = _identifier(type(model).__name__)
    if getattr(transformers, base, None) is not type(model):
        raise ValueError(f"cannot ship a quantized-KV subclass of {type(model).__module__}.{base}: not a transformers class")
    return f"from transformers import {base} as _Base", base


def write_remote_cache_code(model: Any, directory: Path) -> None:
    """Add the two files and point ``auto_map["AutoModelForCausalLM"]`` at the cache-aware subclass."""
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    auto_map = dict(config.get("auto_map") or {})
    base_import, base = _base_class_import(model)
    cls = f"{base}WithQuantizedKV"
    shutil.copyfile(quantized.__file__, directory / CACHE_FILE)
    (directory / MODELING_FILE).write_text(_TEMPLATE.format(cls=cls, base_import=base_import))
    auto_map["AutoModelForCausalLM"] = f"{Path(MODELING_FILE).stem}.{cls}"
    config["auto_map"] = auto_map
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
