"""Model surgery, in one place: convert to a3q's own classes, swap a module, rebuild a layer at new sizes.

Stages change models only through these functions and the ModelGraph, so how a module is replaced (and what must be
updated with it: the config's per-layer sizes, the graph's description) is decided once.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from a3q.arch import FAMILIES, LINEAR_PATHS, decoder_layers, describe
from a3q.arch.auto import is_a3_model, to_a3_model
from a3q.graph import ModelGraph


def redescribe(graph: ModelGraph, model: Any = None) -> ModelGraph:
    """``graph`` re-read from (a new) ``model``'s config, keeping every field the config does not hold.

    The per-layer sizes come from the config; the KV-cache setting, history, adapter, layer store, source, tokenizer
    and how each linear is stored (recorded by the stage that quantized it) are the graph's own and carry over.
    """
    model = graph.model if model is None else model
    fresh = describe(model, graph.tokenizer, graph.source, graph.history)
    fresh.kv_cache, fresh.adapter, fresh.layer_store = graph.kv_cache, graph.adapter, graph.layer_store
    for layer, old in zip(fresh.layers, graph.layers):
        layer.quantized = dict(old.quantized)
    return fresh


def as_a3_graph(graph: ModelGraph) -> ModelGraph:
    """The same model as a3q's compressed class at full rank (identical logits); a no-op for models that already are."""
    if is_a3_model(graph.model):
        return graph
    return redescribe(graph, to_a3_model(graph.model))


def layer_weights(model: Any, family: str, index: int) -> dict[str, Any]:
    """``short.kind`` → tensor of decoder layer ``index``: every linear's weight and bias, and the q/k norm weights
    of families that have them (what A³ changes; :func:`rebuild_layer` takes the same keys)."""
    layer = decoder_layers(model, family)[index]
    paths = dict(LINEAR_PATHS[family])
    if FAMILIES[family].qk_norm_paths is not None:
        paths.update(zip(("q_norm", "k_norm"), FAMILIES[family].qk_norm_paths))
    weights = {}
    for short, path in paths.items():
        module = layer.get_submodule(path)
        for kind in ("weight", "bias"):
            if getattr(module, kind, None) is not None:
                weights[f"{short}.{kind}"] = getattr(module, kind)
    return weights


def with_separate_linears(graph: ModelGraph) -> ModelGraph:
    """Dense GPT-2 fuses q/k/v into one Conv1D: convert it to a3q's class (same logits) so every projection is its
    own ``nn.Linear``, as the quantization and LoRA stages need; other models are returned unchanged."""
    return as_a3_graph(graph) if graph.family == "gpt2" else graph


def swap_module(model: nn.Module, path: str, replacement: nn.Module) -> nn.Module:
    """Put ``replacement`` at ``path`` (a dotted module path) and return the module it replaced."""
    old = model.get_submodule(path)
    model.set_submodule(path, replacement)
    return old


def rebuild_layer(model: Any, family: str, index: int, weights: dict[str, Any], sizes: dict[str, Any]) -> None:
    """Replace decoder layer ``index`` of an a3q-class model by a new one at ``sizes``, holding ``weights``.

    ``sizes`` sets the config's per-layer lists (``qk_head_dims``, ``vo_head_dims``, ``intermediate_sizes`` and,
    under RoPE, ``rope_pairs``) at ``index``; ``weights`` maps ``short.kind`` (``q.weight``, ``up.bias``, …) to the
    new tensors (``q_norm``/``k_norm`` too, for families with q/k norms); every other tensor (norms) is kept.
    """
    config = model.config
    for name, value in sizes.items():
        if getattr(config, name, None) is not None:
            getattr(config, name)[index] = value
    layers = decoder_layers(model, family)
    old = layers[index]
    state = old.state_dict()
    paths = dict(LINEAR_PATHS[family])
    if FAMILIES[family].qk_norm_paths is not None:
        paths.update(zip(("q_norm", "k_norm"), FAMILIES[family].qk_norm_paths))
    for key, tensor in weights.items():
        short, kind = key.split(".")
        state[f"{paths[short]}.{kind}"] = tensor
    reference = next(old.parameters())
    new = type(old)(config, index).to(device=reference.device, dtype=reference.dtype)
    new.load_state_dict(state, strict=True)
    new.train(old.training)
    layers[index] = new
