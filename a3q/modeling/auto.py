"""A³ model classes: registration with transformers' Auto classes, and remote-code export.

Importing this module registers ``a3q_llama`` / ``a3q_gpt2`` / ``a3q_gemma3`` / ``a3q_qwen3`` with ``AutoConfig`` and ``AutoModelForCausalLM``
(idempotent), so ``AutoModelForCausalLM.from_pretrained(dir)`` works in-process. ``save_with_remote_code`` also
writes the self-contained modeling file next to the weights, so a process WITHOUT a3q can load the checkpoint with
``trust_remote_code=True``.
"""

import shutil
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from a3q.modeling import (a3q_bnb_cpu, a3q_factored_linear, a3q_gptq_linear, modeling_a3q_gemma3, modeling_a3q_gpt2,
                          modeling_a3q_llama, modeling_a3q_qwen3)
from a3q.modeling.modeling_a3q_gemma3 import A3Gemma3Config, A3Gemma3ForCausalLM, A3Gemma3Model
from a3q.modeling.modeling_a3q_gpt2 import A3GPT2Config, A3GPT2ForCausalLM, A3GPT2Model
from a3q.modeling.modeling_a3q_llama import A3LlamaConfig, A3LlamaForCausalLM, A3LlamaModel
from a3q.modeling.modeling_a3q_qwen3 import A3Qwen3Config, A3Qwen3ForCausalLM, A3Qwen3Model

__all__ = [
    "A3LlamaConfig",
    "A3LlamaForCausalLM",
    "A3LlamaModel",
    "A3GPT2Config",
    "A3GPT2ForCausalLM",
    "A3GPT2Model",
    "A3_MODEL_TYPES",
    "register_auto_classes",
    "save_with_remote_code",
    "add_remote_code",
    "is_a3_model",
    "remote_code_entry",
    "to_a3_model",
    "a3_config_from_dense",
    "a3_model_from_state_dict",
]

# model_type -> (modeling module, config class name, causal-LM class name)
_REMOTE_CODE = {
    A3LlamaConfig.model_type: (modeling_a3q_llama, "A3LlamaConfig", "A3LlamaForCausalLM"),
    A3GPT2Config.model_type: (modeling_a3q_gpt2, "A3GPT2Config", "A3GPT2ForCausalLM"),
    A3Gemma3Config.model_type: (modeling_a3q_gemma3, "A3Gemma3Config", "A3Gemma3ForCausalLM"),
    A3Qwen3Config.model_type: (modeling_a3q_qwen3, "A3Qwen3Config", "A3Qwen3ForCausalLM"),
}
# modeling files another one imports (relatively) besides the helpers every artifact gets
_REMOTE_CODE_DEPENDENCIES = {A3Gemma3Config.model_type: (modeling_a3q_llama,), A3Qwen3Config.model_type: (modeling_a3q_llama,)}
A3_MODEL_TYPES = frozenset(_REMOTE_CODE)


def register_auto_classes() -> None:
    """Register every A³ class with AutoConfig / AutoModel / AutoModelForCausalLM (safe to call repeatedly)."""
    for config_cls, base_cls, lm_cls in (
        (A3LlamaConfig, A3LlamaModel, A3LlamaForCausalLM),
        (A3GPT2Config, A3GPT2Model, A3GPT2ForCausalLM),
        (A3Gemma3Config, A3Gemma3Model, A3Gemma3ForCausalLM),
        (A3Qwen3Config, A3Qwen3Model, A3Qwen3ForCausalLM),
    ):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, base_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)


register_auto_classes()

from a3q.modeling.convert import a3_config_from_dense, a3_model_from_state_dict, to_a3_model  # noqa: E402


def is_a3_model(model: object) -> bool:
    """True for A³ models, including ones loaded via remote code (whose classes are not a3q's objects)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in A3_MODEL_TYPES


def remote_code_entry(model_type: str) -> tuple[str, str]:
    """``(modeling file stem, causal-LM class name)`` that a3q ships for ``model_type``."""
    module, _, lm_name = _REMOTE_CODE[model_type]
    return Path(module.__file__).stem, lm_name


def save_with_remote_code(model: PreTrainedModel, directory: str | Path, max_shard_size: int | str = "50GB") -> Path:
    """Save ``model`` (safetensors) plus its modeling file, loadable with ``trust_remote_code=True`` without a3q.

    Sets ``config.auto_map`` so the Auto classes find ``modeling_a3q_*.py`` in ``directory``. Weights larger than
    ``max_shard_size`` (transformers' default, ``"50GB"``) are written as shards plus ``model.safetensors.index.json``
    by ``save_pretrained``, one shard at a time.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    add_remote_code(model, directory, save=lambda: model.save_pretrained(directory, max_shard_size=max_shard_size))
    return directory


def add_remote_code(model: PreTrainedModel, directory: Path, save) -> None:
    """Point ``model.config.auto_map`` at a3q's modeling file, run ``save()`` (which writes the config and weights
    into ``directory``), then copy the modeling file and the helpers it imports next to them."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _REMOTE_CODE:
        raise ValueError(f"save_with_remote_code expects an A3 model, got model_type={model_type!r}.")
    module, config_name, lm_name = _REMOTE_CODE[model_type]
    stem = Path(module.__file__).stem
    model.config.auto_map = {
        "AutoConfig": f"{stem}.{config_name}",
        "AutoModelForCausalLM": f"{stem}.{lm_name}",
    }
    save()
    shutil.copyfile(module.__file__, directory / f"{stem}.py")
    # the modeling file imports these (relative imports): factored and GPTQ linears rebuilt from config.a3q_factorized
    # / config.a3q_gptq, and the exact CPU path for bitsandbytes 4-bit linears
    for helper in (a3q_factored_linear, a3q_gptq_linear, a3q_bnb_cpu, *_REMOTE_CODE_DEPENDENCIES.get(model_type, ())):
        shutil.copyfile(helper.__file__, directory / Path(helper.__file__).name)
