"""Ship the quantized KV cache inside an artifact, so ``generate()`` uses it under ``trust_remote_code=True``.

transformers builds generation caches from a fixed list of names, so a process without a3q only gets our cache if
the model class asks for it. The artifact therefore gets two small files: ``a3q_kv_cache.py`` (a copy of
:mod:`a3q.cache.quantized`, torch + transformers only) and ``modeling_a3q_kv.py``, a subclass of the model's class
whose ``_prepare_cache_for_generation`` builds that cache from ``generation_config.a3q_kv_cache``; ``auto_map``
points ``AutoModelForCausalLM`` at the subclass.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

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


def write_remote_cache_code(model: Any, directory: Path) -> None:
    """Add the two files and point ``auto_map["AutoModelForCausalLM"]`` at the cache-aware subclass."""
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    auto_map = dict(config.get("auto_map") or {})
    current = auto_map.get("AutoModelForCausalLM")
    if current:  # a3q's own class, shipped as remote code next to this file
        stem, base = current.split(".")
        base_import = f"from .{stem} import {base} as _Base"
    else:  # a transformers class
        base = type(model).__name__
        base_import = f"from transformers import {base} as _Base"
    cls = f"{base}WithQuantizedKV"
    shutil.copyfile(quantized.__file__, directory / CACHE_FILE)
    (directory / MODELING_FILE).write_text(_TEMPLATE.format(cls=cls, base_import=base_import))
    auto_map["AutoModelForCausalLM"] = f"{Path(MODELING_FILE).stem}.{cls}"
    config["auto_map"] = auto_map
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
