"""What a vLLM server may load from an a3q artifact, decided before any weight is read.

Every refusal is a :class:`ServeRefusal` whose message is ONE line naming the artifact and the reason, raised in
the process that parses the model's config (vLLM's front end), so a user sees it at once and not behind an
engine-start failure. Imports: :mod:`a3q.io.manifest` and the module-type registry (:mod:`a3q.module_types`, whose
entries say what vLLM can serve), no vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from a3q.io.manifest import MANIFEST_NAME, ArtifactError, read_manifest, verify_artifact
from a3q.module_types import MODULE_TYPES

__all__ = [
    "A3Q_ARCHITECTURES",
    "SUPPORTED",
    "ServeRefusal",
    "check_servable",
    "supported_line",
    "unsupported_family_line",
]

#: a3q model_type -> (architecture in config.json, what it covers), for the families the plugin serves
SUPPORTED: dict[str, tuple[str, str]] = {
    "a3q_llama": ("A3LlamaForCausalLM", "Llama, Mistral, Qwen2"),
    "a3q_gemma3": ("A3Gemma3ForCausalLM", "Gemma 3"),
}

#: every a3q model_type and its architecture name (a3q.modeling); the ones not in SUPPORTED are refused
A3Q_ARCHITECTURES: dict[str, str] = {
    "a3q_llama": "A3LlamaForCausalLM",
    "a3q_gemma3": "A3Gemma3ForCausalLM",
    "a3q_gpt2": "A3GPT2ForCausalLM",
    "a3q_phi3": "A3Phi3ForCausalLM",
    "a3q_qwen3": "A3Qwen3ForCausalLM",
    "a3q_gemma2": "A3Gemma2ForCausalLM",
}


#: how a refusal names the artifacts holding a module type
MODULE_TYPE_NAMES = {"gptq": "A³ + GPTQ", "low_rank": "low-rank baseline (two-factor linears)",
                     "bnb": "bitsandbytes-quantized"}


class ServeRefusal(RuntimeError):
    """An artifact vLLM must not serve (damaged, or something the plugin does not run). The message is one line.

    A RuntimeError on purpose: vLLM's config classes are pydantic dataclasses, which wrap a ValueError raised while
    they are built into a multi-line validation report; a RuntimeError reaches the user as it is.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def supported_line() -> str:
    return ", ".join(f"{t} ({what})" for t, (_, what) in SUPPORTED.items())


def unsupported_family_line(model_type: str, where: str | Path | None = None) -> str:
    """The one-line refusal for an a3q family the plugin does not serve."""
    head = f"{where}: " if where else ""
    return (f"{head}a3q's vLLM plugin does not serve {model_type} artifacts; it serves {supported_line()}. "
            f"Use a3q.load() or transformers (trust_remote_code=True) for this one.")


def _config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ServeRefusal(f"{folder}: cannot read config.json ({exc})") from None
    if not isinstance(config, dict):
        raise ServeRefusal(f"{folder}: config.json is not a JSON object")
    return config


def _generation_config(folder: Path) -> dict[str, Any]:
    try:
        payload = json.loads((folder / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def _weights_present(folder: Path) -> None:
    """A sharded folder's index must name only shards that exist (also checked by the manifest; this covers a
    plain folder without one)."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        if not any(folder.glob("*.safetensors")):
            raise ServeRefusal(f"{folder}: no safetensors weights")
        return
    try:
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise ServeRefusal(f"{index}: unreadable shard index ({exc})") from None
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise ServeRefusal(f"{folder / shard}: shard named in model.safetensors.index.json is missing")


def check_servable(folder: str | Path, hashes: bool = True) -> dict[str, Any]:
    """Refuse (:class:`ServeRefusal`, one line) anything a3q's vLLM plugin must not serve; return ``config.json``.

    In order: the manifest (``a3q.json``: its seal, every listed file present with its size, nothing unlisted, then
    every SHA-256 unless ``hashes=False``), then what the plugin runs: an a3q family it has model classes for, float
    weights (every swapped-in module type whose registry entry has a serving refusal: GPTQ codes, two-factor low-rank
    baselines, bitsandbytes). A quantized KV cache setting
    (``generation_config.a3q_kv_cache``) is not refused: vLLM keeps its own cache (see docs/serving.md).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ServeRefusal(f"{folder}: not a local artifact folder (a3q's plugin serves a3q artifacts from disk)")
    config = _config(folder)
    model_type = config.get("model_type")
    try:
        manifest = read_manifest(folder)
        if manifest is None:
            raise ServeRefusal(f"{folder}: no {MANIFEST_NAME}; an a3q artifact must carry its manifest to be served "
                               f"(re-export it with a3q)")
        verify_artifact(folder, manifest, hashes=hashes)
    except ArtifactError as exc:
        raise ServeRefusal(f"refusing to serve: {exc}") from None
    _weights_present(folder)
    if model_type not in SUPPORTED:
        raise ServeRefusal(unsupported_family_line(str(model_type), folder))
    for entry in MODULE_TYPES.values():  # what each swapped-in module type says about serving (a3q.module_types)
        if entry.is_recorded_in(config) and entry.serving.refusal is not None:
            raise ServeRefusal(f"{folder}: {MODULE_TYPE_NAMES.get(entry.name, entry.name)} artifacts are not served "
                               f"by a3q's vLLM plugin: {entry.serving.refusal}")
    quant = config.get("quantization_config")
    if quant:  # any other quantizer's weights: not a module type a3q knows how vLLM runs
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ServeRefusal(f"{folder}: quantized A³ weights ({method}) are not served by a3q's vLLM plugin; serve "
                           f"the float A³ artifact")
    return config


def kv_cache_setting(folder: str | Path) -> dict[str, Any] | None:
    """a3q's quantized KV-cache setting of an artifact (``generation_config.a3q_kv_cache``), or None."""
    setting = _generation_config(Path(folder)).get("a3q_kv_cache")
    return setting if isinstance(setting, dict) else None
