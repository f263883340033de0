"""Architecture adapters: map a Hugging Face causal LM onto a :class:`~a3q.graph.ModelGraph`.

One file per family, each a :class:`~a3q.arch.family.Family` registered with ``@register_family``:

* ``llama``: RoPE attention, RMSNorm, gated MLP (Llama, Mistral, Qwen2, and a3q's ``a3q_llama``), MHA or GQA,
  optional q/k/v biases, sliding-window layers.
* ``gpt2``: learned absolute positions (no RoPE), MHA, biases (GPT-2 and ``a3q_gpt2``).
* ``phi3``: Phi-3 (``phi3``, ``a3q_phi3``): Llama's layers with fused ``qkv_proj``/``gate_up_proj``, split on load.
* ``qwen3``: Qwen3 (``qwen3``, ``a3q_qwen3``): Llama's layout plus per-head q/k RMSNorm before RoPE.
* ``gemma2``: Gemma 2 (``gemma2``, ``a3q_gemma2``): no q/k norms; sandwich norms, ``(1 + w)`` gains, GeGLU,
  soft-capped attention and final logits, sliding-window and global layers with one RoPE base.
* ``gemma3``: Gemma 3 text models (``gemma3_text``, ``a3q_gemma3``): per-head q/k RMSNorm before RoPE, sandwich
  norms, GeGLU, sliding-window and global layers with their own RoPE bases.

The module-level tables (``LINEAR_PATHS``, ``SHARED_INPUTS``, ``LAYER_PREFIX``) are views of the registered
adapters keyed by family name, kept for the many call sites that index them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from a3q.arch.family import Family, families, register_family  # noqa: F401  (the interface, re-exported)
from a3q.graph import LayerStructure, ModelGraph


class _AdapterTable(Mapping):
    """family name → the adapter (``attribute`` None) or one of its attributes, looked up when indexed, so the
    adapters register on first use (:func:`a3q.arch.family.families`)."""

    def __init__(self, attribute: str | None = None) -> None:
        self.attribute = attribute

    def __getitem__(self, name: str) -> Any:
        family = families()[name]
        return family if self.attribute is None else getattr(family, self.attribute)

    def __iter__(self) -> Iterator[str]:
        return iter(families())

    def __len__(self) -> int:
        return len(families())


FAMILIES: Mapping[str, Family] = _AdapterTable()
#: family name → short linear name → path relative to a decoder layer (a3q's compressed class)
LINEAR_PATHS: Mapping[str, dict[str, str]] = _AdapterTable("linear_paths")
#: family name → groups of linears that read the same input tensor
SHARED_INPUTS: Mapping[str, tuple[tuple[str, ...], ...]] = _AdapterTable("shared_inputs")
#: family name → state-dict prefix of decoder layer ``{index}``
LAYER_PREFIX: Mapping[str, str] = _AdapterTable("layer_prefix")


def supported_model_types() -> tuple[str, ...]:
    """Every supported ``config.model_type``, in registration order."""
    return tuple(t for f in families().values() for t in f.model_types)


class UnsupportedModelError(ValueError):
    """The model's architecture has no a3q adapter."""


def family_of(config: Any) -> str:
    """The family name of a supported config (a dict or a config object); a clear error listing the supported ones."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    for name, family in families().items():
        if model_type in family.model_types:
            return name
    raise UnsupportedModelError(
        f"model_type '{model_type}' is not supported (supported: {', '.join(supported_model_types())})")


def adapter(family_or_config: str | Any) -> Family:
    """The adapter of a family name or of a config."""
    if isinstance(family_or_config, str):
        return FAMILIES[family_or_config]
    return FAMILIES[family_of(family_or_config)]


def decoder_layers(model: Any, family: str) -> Any:
    """The ModuleList of decoder layers."""
    return model.get_submodule(FAMILIES[family].layers_path)


def final_norm(model: Any, family: str) -> Any:
    """The norm between the last decoder layer and the LM head."""
    return model.get_submodule(FAMILIES[family].final_norm_path)


def lm_logits(model: Any, family: str, last_hidden: Any) -> Any:
    """The logits the model's own forward computes from the last decoder layer's output: final norm, LM head, and
    the final logit soft-cap where the config has one (Gemma 2: ``cap · tanh(logits / cap)``). Layer-by-layer
    evaluations and global allocation's probes go through here, so they score what the model's forward scores."""
    logits = model.get_output_embeddings()(final_norm(model, family)(last_hidden))
    if cap := getattr(model.config, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cap) * cap
    return logits


def layer_linears(model: Any, family: str, index: int) -> dict[str, Any]:
    """Short name → linear module of decoder layer ``index``."""
    layer = decoder_layers(model, family)[index]
    return {name: layer.get_submodule(path) for name, path in LINEAR_PATHS[family].items()}


def layers_from_config(config: Any) -> tuple[str, int, list[LayerStructure]]:
    """(family, hidden size, per-layer structure) read from a config alone: no weights needed."""
    family = adapter(config)
    hidden, layers = family.hidden_size(config), family.layer_structures(config)
    # low-rank baselines record their two-factor linears (module path → rank) in the config
    factored = getattr(config, "a3q_factorized", None) or {}
    for index, layer in enumerate(layers):
        prefix = family.layer_prefix.format(index=index)
        for name, path in family.linear_paths.items():
            if prefix + path in factored:
                layer.factor_ranks[name] = int(factored[prefix + path])
    return family.name, hidden, layers


def describe(model: Any, tokenizer: Any, source: str, history: list | None = None) -> ModelGraph:
    """Build the ModelGraph of a loaded model from its config (never from guessing module shapes)."""
    family, hidden, layers = layers_from_config(model.config)
    return ModelGraph(model=model, tokenizer=tokenizer, family=family, hidden_size=hidden, layers=layers,
                      uses_rope=FAMILIES[family].uses_rope, source=source, history=list(history or []))
