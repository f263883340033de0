"""Apply a rank plan to a whole model: new weights layer by layer, then a smaller model.

Dense Llama-family and GPT-2 models are first converted to a3q's own classes at full rank
(identical logits), so compression is only a change of weights and per-layer sizes in the config.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from a3q.arch import LAYER_PREFIX, LINEAR_PATHS, describe
from a3q.graph import ModelGraph
from a3q.stages.a3.compress import LayerResult, compress_layer
from a3q.stages.a3.ranks import LayerRanks
from a3q.stages.a3.statistics import LayerStatistics


def as_a3_graph(graph: ModelGraph) -> ModelGraph:
    """The same model as a3q's compressed class (a no-op for models that already are)."""
    from a3q.modeling import is_a3_model, to_a3_model

    if is_a3_model(graph.model):
        return graph
    model = to_a3_model(graph.model)
    converted = describe(model, graph.tokenizer, graph.source, graph.history)
    converted.kv_cache_bits = graph.kv_cache_bits
    return converted


def with_separate_linears(graph: ModelGraph) -> ModelGraph:
    """Dense GPT-2 fuses q/k/v into one Conv1D: convert it to a3q's class (same logits) so every projection is its
    own ``nn.Linear``, as the quantization and LoRA stages need; other models are returned unchanged."""
    return as_a3_graph(graph) if graph.family == "gpt2" else graph


def compress_model(
    graph: ModelGraph,
    statistics: list[LayerStatistics],
    plans: list[LayerRanks],
    damping: float,
    components: frozenset[str] = frozenset({"qk", "ov", "mlp"}),
    progress: bool = True,
) -> tuple[ModelGraph, list[LayerResult]]:
    """Compress the enabled components of every layer; returns the new graph and per-layer results."""
    from a3q.modeling import a3_config_from_dense, a3_model_from_state_dict

    state = graph.model.state_dict()
    paths = LINEAR_PATHS[graph.family]
    results = []
    for index in tqdm(range(len(graph.layers)), desc="A³ decomposition", disable=not progress, leave=False):
        prefix = LAYER_PREFIX[graph.family].format(index=index)
        weights = {
            f"{short}.{kind}": state[f"{prefix}{path}.{kind}"]
            for short, path in paths.items()
            for kind in ("weight", "bias")
            if f"{prefix}{path}.{kind}" in state
        }
        result = compress_layer(
            weights, graph.layers[index], statistics[index], plans[index], graph.uses_rope, damping, components
        )
        for key, tensor in result.weights.items():
            short, kind = key.split(".")
            state[f"{prefix}{paths[short]}.{kind}"] = tensor
        results.append(result)
    layers = [result.structure for result in results]
    overrides = {
        "qk_head_dims": [layer.qk_head_dim for layer in layers],
        "vo_head_dims": [layer.vo_head_dim for layer in layers],
        "intermediate_sizes": [layer.intermediate_size for layer in layers],
    }
    if graph.uses_rope:
        overrides["rope_pairs"] = [layer.rope_pairs for layer in layers]
    config = a3_config_from_dense(graph.model.config, **overrides)
    model = a3_model_from_state_dict(config, state, reference=graph.model)
    model.generation_config = graph.model.generation_config
    compressed = describe(model, graph.tokenizer, graph.source, graph.history)
    compressed.kv_cache_bits = graph.kv_cache_bits
    return compressed, results
