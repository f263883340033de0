"""Apply a rank plan to a whole model from statistics already collected: new weights layer by layer, then a smaller
model (a new object; the input graph is untouched). Used by benchmarks that sweep ratios over one set of statistics;
the ``a3`` stage itself changes layers one at a time in the engine's pipeline.

Dense Llama-family and GPT-2 models are first converted to a3q's own classes at full rank
(identical logits), so compression is only a change of weights and per-layer sizes in the config.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from a3q.arch import FAMILIES, LAYER_PREFIX, LINEAR_PATHS
from a3q.arch.auto import a3_config_from_dense, a3_model_from_state_dict
from a3q.arch.surgery import as_a3_graph, layer_weights, redescribe, with_separate_linears  # noqa: F401
from a3q.graph import ModelGraph
from a3q.stages.a3.compress import LayerResult, compress_layer
from a3q.stages.a3.ranks import LayerRanks
from a3q.stages.a3.statistics import LayerStatistics


def layer_sizes(result: LayerResult) -> dict:
    """The config's per-layer size entries of one compressed layer (for :func:`a3q.arch.surgery.rebuild_layer`)."""
    structure = result.structure
    return {"qk_head_dims": structure.qk_head_dim, "vo_head_dims": structure.vo_head_dim,
            "intermediate_sizes": structure.intermediate_size, "rope_pairs": structure.rope_pairs}


def qk_norm_setting(graph: ModelGraph, mode: str) -> tuple[float, str] | None:
    """``(gain offset, mode)`` for :func:`compress_layer` when the family normalises q and k per head, else None."""
    family = FAMILIES[graph.family]
    return None if family.qk_norm_paths is None else (family.norm_weight_offset, mode)


def compress_model(
    graph: ModelGraph,
    statistics: list[LayerStatistics],
    plans: list[LayerRanks],
    damping: float,
    components: frozenset[str] = frozenset({"qk", "ov", "mlp"}),
    progress: bool = True,
    qk_norm: str = "pre_norm",
) -> tuple[ModelGraph, list[LayerResult]]:
    """Compress the enabled components of every layer; returns the new graph and per-layer results.

    ``qk_norm`` says how QK is compressed in families with per-head q/k norms (:mod:`a3q.stages.a3.qk_norm`).
    """
    state = graph.model.state_dict()
    paths = dict(LINEAR_PATHS[graph.family])
    norm_paths = FAMILIES[graph.family].qk_norm_paths
    if norm_paths is not None:
        paths.update(zip(("q_norm", "k_norm"), norm_paths))
    results = []
    for index in tqdm(range(len(graph.layers)), desc="A³ decomposition", disable=not progress, leave=False):
        prefix = LAYER_PREFIX[graph.family].format(index=index)
        weights = {f"{short}.{kind}": state[f"{prefix}{path}.{kind}"] for short, path in paths.items()
                   for kind in ("weight", "bias") if f"{prefix}{path}.{kind}" in state}
        result = compress_layer(weights, graph.layers[index], statistics[index], plans[index], graph.uses_rope,
                                damping, components, qk_norm_setting(graph, qk_norm))
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
    return redescribe(graph, model), results
