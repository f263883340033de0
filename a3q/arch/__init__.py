"""Architecture adapters: map a Hugging Face causal LM onto a :class:`~a3q.graph.ModelGraph`.

Two families cover what A³ distinguishes:

* ``llama``: RoPE attention, RMSNorm, gated MLP (Llama, Mistral, Qwen2, and a3q's compressed
  ``a3q_llama``), MHA or GQA, optional q/k/v biases.
* ``gpt2``: learned absolute positions (no RoPE), MHA, biases (GPT-2 and ``a3q_gpt2``).
"""

from __future__ import annotations

from typing import Any

from a3q.graph import LayerStructure, ModelGraph

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2", "a3q_llama")
GPT2_MODEL_TYPES = ("gpt2", "a3q_gpt2")


# Short names of each decoder layer's linears, relative to the layer module, for a3q's own
# model classes (and dense Llama-family models, which use the same names). Dense GPT-2 fuses
# q/k/v into one Conv1D and is converted to ``a3q_gpt2`` before stages touch its linears.
LINEAR_PATHS = {
    "llama": {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    },
    "gpt2": {
        "q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
        "up": "mlp.c_fc", "down": "mlp.c_proj",
    },
}
# Linears that read the same input tensor (one Hessian / statistic serves the whole group).
SHARED_INPUTS = {"llama": (("q", "k", "v"), ("gate", "up")), "gpt2": (("q", "k", "v"),)}
LAYER_PREFIX = {"llama": "model.layers.{index}.", "gpt2": "transformer.h.{index}."}


def decoder_layers(model: Any, family: str) -> Any:
    """The ModuleList of decoder layers."""
    return model.model.layers if family == "llama" else model.transformer.h


def final_norm(model: Any, family: str) -> Any:
    """The norm between the last decoder layer and the LM head."""
    return model.model.norm if family == "llama" else model.transformer.ln_f


def layer_linears(model: Any, family: str, index: int) -> dict[str, Any]:
    """Short name → linear module of decoder layer ``index``."""
    layer = decoder_layers(model, family)[index]
    return {name: layer.get_submodule(path) for name, path in LINEAR_PATHS[family].items()}


class UnsupportedModelError(ValueError):
    """The model's architecture has no a3q adapter."""


def family_of(config: Any) -> str:
    """``llama`` or ``gpt2`` for a supported config; a clear error otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type in LLAMA_MODEL_TYPES:
        return "llama"
    if model_type in GPT2_MODEL_TYPES:
        return "gpt2"
    supported = ", ".join(LLAMA_MODEL_TYPES + GPT2_MODEL_TYPES)
    raise UnsupportedModelError(f"model_type '{model_type}' is not supported (supported: {supported})")


def _per_layer(config: Any, name: str, default: int, count: int) -> list[int]:
    values = getattr(config, name, None)
    return list(values) if values else [default] * count


def _llama_layers(config: Any) -> list[LayerStructure]:
    count = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    qk = _per_layer(config, "qk_head_dims", head_dim, count)
    vo = _per_layer(config, "vo_head_dims", head_dim, count)
    ff = _per_layer(config, "intermediate_sizes", config.intermediate_size, count)
    pairs = getattr(config, "rope_pairs", None) or [None] * count
    return [
        LayerStructure(
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            qk_head_dim=qk[i],
            vo_head_dim=vo[i],
            intermediate_size=ff[i],
            gated_mlp=True,
            rope_pairs=pairs[i],
        )
        for i in range(count)
    ]


def _gpt2_layers(config: Any) -> list[LayerStructure]:
    count = config.n_layer
    head_dim = config.n_embd // config.n_head
    inner = config.n_inner or 4 * config.n_embd
    qk = _per_layer(config, "qk_head_dims", head_dim, count)
    vo = _per_layer(config, "vo_head_dims", head_dim, count)
    ff = _per_layer(config, "intermediate_sizes", inner, count)
    return [
        LayerStructure(
            num_heads=config.n_head,
            num_kv_heads=config.n_head,
            head_dim=head_dim,
            qk_head_dim=qk[i],
            vo_head_dim=vo[i],
            intermediate_size=ff[i],
            gated_mlp=False,
        )
        for i in range(count)
    ]


def layers_from_config(config: Any) -> tuple[str, int, list[LayerStructure]]:
    """(family, hidden size, per-layer structure) read from a config alone: no weights needed."""
    family = family_of(config)
    if family == "llama":
        hidden, layers = config.hidden_size, _llama_layers(config)
    else:
        hidden, layers = config.n_embd, _gpt2_layers(config)
    # low-rank baselines record their two-factor linears (module path → rank) in the config
    factored = getattr(config, "a3q_factorized", None) or {}
    for index, layer in enumerate(layers):
        prefix = LAYER_PREFIX[family].format(index=index)
        for name, path in LINEAR_PATHS[family].items():
            if prefix + path in factored:
                layer.factor_ranks[name] = int(factored[prefix + path])
    return family, hidden, layers


def describe(model: Any, tokenizer: Any, source: str, history: list | None = None) -> ModelGraph:
    """Build the ModelGraph of a loaded model from its config (never from guessing module shapes)."""
    family, hidden, layers = layers_from_config(model.config)
    return ModelGraph(
        model=model,
        tokenizer=tokenizer,
        family=family,
        hidden_size=hidden,
        layers=layers,
        uses_rope=family == "llama",
        source=source,
        history=list(history or []),
    )
