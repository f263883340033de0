"""A³ model classes: registration with transformers' Auto classes, and remote-code export.

Importing this module registers every family's compressed class (``a3q_llama``, ``a3q_gpt2``, ``a3q_gemma3``, …, as
the adapters in :mod:`a3q.arch` name them) with ``AutoConfig`` and ``AutoModelForCausalLM`` (idempotent), so
``AutoModelForCausalLM.from_pretrained(dir)`` works in-process. ``save_with_remote_code`` also writes the
self-contained modeling file next to the weights, with every sibling file it imports, so a process WITHOUT a3q can
load the checkpoint with ``trust_remote_code=True``.

Nothing here names a family: a new adapter's ``compressed_classes()`` is all this module needs.
"""

import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from a3q.arch import families
from a3q.modeling.modeling_a3q_gpt2 import A3GPT2Config, A3GPT2ForCausalLM, A3GPT2Model
from a3q.modeling.modeling_a3q_llama import A3LlamaConfig, A3LlamaForCausalLM, A3LlamaModel

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

#: compressed model_type -> (config class, base model class, causal-LM class), from every registered adapter
COMPRESSED_CLASSES = {classes[0].model_type: classes for classes in (f.compressed_classes() for f in families().values())}
A3_MODEL_TYPES = frozenset(COMPRESSED_CLASSES)

#: ``from .name import ...``: how a modeling file imports its siblings (it must stay importable without a3q)
_RELATIVE_IMPORT = re.compile(r"^\s*from \.(\w+) import", re.MULTILINE)


def register_auto_classes() -> None:
    """Register every A³ class with AutoConfig / AutoModel / AutoModelForCausalLM (safe to call repeatedly)."""
    for config_cls, base_cls, lm_cls in COMPRESSED_CLASSES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, base_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)


register_auto_classes()

from a3q.arch.convert import a3_config_from_dense, a3_model_from_state_dict, to_a3_model  # noqa: E402,F401 (re-exported)


def is_a3_model(model: object) -> bool:
    """True for A³ models, including ones loaded via remote code (whose classes are not a3q's objects)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in A3_MODEL_TYPES


def _modeling_module(model_type: str) -> ModuleType:
    """The module that defines ``model_type``'s causal-LM class."""
    return sys.modules[COMPRESSED_CLASSES[model_type][2].__module__]


def remote_code_entry(model_type: str) -> tuple[str, str]:
    """``(modeling file stem, causal-LM class name)`` that a3q ships for ``model_type``."""
    return Path(_modeling_module(model_type).__file__).stem, COMPRESSED_CLASSES[model_type][2].__name__


def remote_code_files(model_type: str) -> list[Path]:
    """The modeling file of ``model_type`` and every sibling file it imports, transitively (relative imports)."""
    folder = Path(_modeling_module(model_type).__file__).parent
    pending, found = [Path(_modeling_module(model_type).__file__)], []
    while pending:
        path = pending.pop()
        if path in found:
            continue
        found.append(path)
        pending.extend(folder / f"{name}.py" for name in _RELATIVE_IMPORT.findall(path.read_text()))
    return found


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
    into ``directory``), then copy the modeling file and the sibling files it imports next to them (the factored,
    GPTQ and bitsandbytes-CPU linears, and a parent family's modeling file)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in A3_MODEL_TYPES:
        raise ValueError(f"save_with_remote_code expects an A3 model, got model_type={model_type!r}.")
    stem, lm_name = remote_code_entry(model_type)
    model.config.auto_map = {
        "AutoConfig": f"{stem}.{COMPRESSED_CLASSES[model_type][0].__name__}",
        "AutoModelForCausalLM": f"{stem}.{lm_name}",
    }
    save()
    for path in remote_code_files(model_type):
        shutil.copyfile(path, directory / path.name)
