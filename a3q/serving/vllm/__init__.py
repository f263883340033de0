"""a3q's vLLM plugin: ``vllm serve ARTIFACT`` and ``LLM(model=ARTIFACT)`` with no extra flags.

vLLM calls :func:`register` (entry point ``vllm.general_plugins``, ``a3q = "a3q.serving.vllm:register"``) in every
process it starts, before it reads a model's config. It

1. registers a3q's config classes with transformers' ``AutoConfig`` (``a3q_llama``, ``a3q_gemma3``), so
   ``config.json`` is read by installed code: nothing from the artifact folder is executed, no ``trust_remote_code``;
   the a3q families the plugin does not serve get a config class that refuses them in one line, naming the
   supported ones;
2. registers the native vLLM model classes lazily (``"module:Class"`` strings: nothing heavy is imported until vLLM
   builds the model): ``A3LlamaForCausalLM`` (:mod:`a3q.serving.vllm.llama`) and ``A3Gemma3ForCausalLM``
   (:mod:`a3q.serving.vllm.gemma3`);
3. hooks a check into vLLM's per-architecture config hook (``MODELS_CONFIG_MAP``) that verifies the artifact
   against its manifest (:func:`a3q.serving.checks.check_servable`) in the front-end process, before any engine
   process starts: a tampered manifest, a missing shard or an unservable artifact is refused there, in one line.

Every step is idempotent: calling :func:`register` twice (vLLM does, in different processes, and may in one) is
harmless. Dense models and every other architecture are left alone.
"""

from __future__ import annotations

import logging

from transformers import AutoConfig, PretrainedConfig

from a3q.modeling.modeling_a3q_gemma3 import A3Gemma3Config
from a3q.modeling.modeling_a3q_llama import A3LlamaConfig
from a3q.serving.checks import A3Q_ARCHITECTURES, SUPPORTED, ServeRefusal, unsupported_family_line

__all__ = ["register", "ARCHITECTURES"]

logger = logging.getLogger(__name__)

#: architecture (config.json) -> "module:Class" of the vLLM model class
ARCHITECTURES = {
    "A3LlamaForCausalLM": "a3q.serving.vllm.llama:A3LlamaForCausalLM",
    "A3Gemma3ForCausalLM": "a3q.serving.vllm.gemma3:A3Gemma3ForCausalLM",
}


_REFUSING: dict[str, type] = {}


def _refusing_config(model_type: str):
    """A config class for an a3q family the plugin does not serve: reading its config.json refuses, in one line."""
    if model_type in _REFUSING:
        return _REFUSING[model_type]
    def from_dict(cls, config_dict, **kwargs):
        raise ServeRefusal(unsupported_family_line(model_type, kwargs.get("name_or_path")))

    _REFUSING[model_type] = type(f"A3qUnservedConfig_{model_type}", (PretrainedConfig,),
                                 {"model_type": model_type, "from_dict": classmethod(from_dict), "__module__": __name__})
    return _REFUSING[model_type]


def register_configs() -> None:
    """transformers' AutoConfig learns a3q's config classes (served ones) and refusing stand-ins (the others)."""
    for config_cls in (A3LlamaConfig, A3Gemma3Config):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    for model_type in A3Q_ARCHITECTURES:
        if model_type in SUPPORTED:
            continue
        AutoConfig.register(model_type, _refusing_config(model_type), exist_ok=True)


def register_models() -> None:
    """vLLM's ModelRegistry learns a3q's architectures, lazily."""
    from vllm import ModelRegistry  # deferred: vLLM is installed in the serving venv only

    for arch, target in ARCHITECTURES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, target)


def register_checks() -> None:
    """The artifact check, in vLLM's per-architecture config hook (runs where the config is built)."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP  # deferred: vLLM, as above

    from a3q.serving.vllm.hook import A3ServeCheck  # deferred: imports vLLM

    for arch in ARCHITECTURES:
        MODELS_CONFIG_MAP[arch] = A3ServeCheck


def register() -> None:
    """vLLM's ``general_plugins`` entry point: all three registrations (idempotent)."""
    register_configs()
    register_models()
    register_checks()
