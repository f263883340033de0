"""Stage ``kv``: spend a separate budget on the KV cache: fewer key/value dims, and/or a quantized cache.

```yaml
- stage: kv
  kv_ratio: 0.3        # remove 30% of the KV bytes per token by shrinking k and v head dims (A³ QK + OV, MLP untouched)
  # or explicit sizes:  qk_rank: 48  vo_rank: 40
  bits: 8              # quantize the cache (4 or 8); full precision when absent
  group_size: 32       # channels per group (per-token) / tokens per block (per-channel keys)
  residual: 128        # the most recent tokens stay in full precision
  key_axis: channel    # keys per channel (KIVI) or per token; values are always per token
```

**Ranks.** ``kv_ratio`` removes that fraction of each layer's cached values ``h_kv·(r_qk + r_vo)``: r_qk is cut by the
ratio and rounded down to even under RoPE (and to ``rank_multiple``), then r_vo takes the rest of the budget, so the
achieved reduction is the target rounded to one rank step. The new weights are A³'s QK and OV solutions from
statistics of the model as this stage finds it.

**With an ``a3`` stage** (checked at recipe validation): put ``a3`` first. ``kv_ratio`` is then relative to the
cache A³ left (the two reductions multiply), explicit ``qk_rank``/``vo_rank`` are absolute sizes that must not
exceed an earlier a3 stage's explicit ranks, and rank reduction needs float weights (before any quantization
stage). Only one ``kv`` stage may set ``bits``.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Literal

from pydantic import Field, model_validator

from a3q.graph import ModelGraph
from a3q.registry import StageConfig, register_stage
from a3q.stages.a3.apply import as_a3_graph, compress_model
from a3q.stages.a3.ranks import LayerRanks, plan_ranks, round_rank
from a3q.stages.a3.statistics import collect_statistics

_CACHE_FIELDS = ("group_size", "residual", "key_axis")


class KVConfig(StageConfig):
    """KV budget (``kv_ratio`` or ``qk_rank``/``vo_rank``) and quantized-cache setting; see the module docstring."""

    needs_calibration = True  # only used when ranks are reduced (windows are cut lazily)

    kv_ratio: float | None = Field(None, gt=0.0, lt=1.0)
    qk_rank: int | None = Field(None, ge=2)
    vo_rank: int | None = Field(None, ge=1)
    rank_multiple: int = Field(1, ge=1, le=1024)
    bits: Literal[4, 8] | None = None
    group_size: int = Field(32, ge=1, le=4096)
    residual: int = Field(128, ge=0)
    key_axis: Literal["channel", "token"] = "channel"
    damping: float = Field(1e-6, ge=0.0, le=1.0)
    batch_size: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _budget_is_consistent(self) -> KVConfig:
        if self.kv_ratio is not None and (self.qk_rank is not None or self.vo_rank is not None):
            raise ValueError("kv_ratio: give either kv_ratio or explicit qk_rank/vo_rank, not both")
        if self.bits is None:
            given = [name for name in _CACHE_FIELDS if name in self.model_fields_set]
            if given:
                raise ValueError(f"{given[0]}: only meaningful for a quantized cache; set bits (4 or 8)")
            if not self.reduces_ranks():
                raise ValueError("nothing to do: set kv_ratio, qk_rank/vo_rank and/or bits")
        return self

    def reduces_ranks(self) -> bool:
        return self.kv_ratio is not None or self.qk_rank is not None or self.vo_rank is not None

    def cache_setting(self) -> dict[str, Any] | None:
        if self.bits is None:
            return None
        return {"bits": self.bits, "group_size": self.group_size, "residual": self.residual, "key_axis": self.key_axis}

    def check_in_recipe(self, earlier: list[Any]) -> list[str]:
        """The a3/kv rule and the other cross-stage checks (see the module docstring)."""
        problems = []
        for spec in earlier:
            config = spec.config
            if self.reduces_ranks() and type(config).produces_factored_linears:
                problems.append(
                    f"kv_ratio: reducing KV ranks needs the q/k/v/o linears that {spec.label} factored into two "
                    "low-rank pieces; put this stage before it, or keep only bits here"
                )
            if self.reduces_ranks() and type(config).produces_quantized_weights:
                problems.append(
                    f"kv_ratio: reducing KV ranks needs float weights but {spec.label} quantized them; "
                    "move this stage before it"
                )
            if spec.name == "a3":
                for name in ("qk_rank", "vo_rank"):
                    mine, theirs = getattr(self, name), getattr(config, name, None)
                    if mine is not None and theirs is not None and mine > theirs:
                        problems.append(f"{name}: {mine} exceeds the {name} {theirs} that {spec.label} leaves")
            if spec.name == "kv" and self.bits is not None and getattr(config, "bits", None) is not None:
                problems.append(f"bits: the cache is already quantized by {spec.label}; set bits in one kv stage")
        return problems


def plan_kv_ranks(graph: ModelGraph, config: KVConfig) -> list[LayerRanks]:
    """Per-layer q/k and v/o sizes for the budget; the MLP keeps its size."""
    layers = graph.layers
    if config.kv_ratio is None:
        explicit = {"qk": config.qk_rank, "ov": config.vo_rank, "mlp": None}
        return plan_ranks(layers, {}, explicit, config.rank_multiple, graph.uses_rope)
    ratio = config.kv_ratio
    qk_plans = plan_ranks(layers, {"qk": ratio}, {}, config.rank_multiple, graph.uses_rope)
    plans = []
    for layer, plan in zip(layers, qk_plans):
        keep_total = (1 - ratio) * (layer.qk_head_dim + layer.vo_head_dim)
        vo = round_rank(keep_total - plan.qk, layer.vo_head_dim, config.rank_multiple, even=False)
        plans.append(LayerRanks(qk=plan.qk, vo=vo, ff=layer.intermediate_size))
    return plans


def reduce_kv_ranks(graph: ModelGraph, statistics: list, plans: list[LayerRanks], config: KVConfig) -> tuple[ModelGraph, list]:
    """A³'s QK and OV solutions at the planned sizes; ``statistics`` from ``collect_statistics(…, {"qk","ov"})``."""
    if config.kv_ratio is not None:
        components = frozenset({"qk", "ov"})
    else:
        components = frozenset(c for c, rank in (("qk", config.qk_rank), ("ov", config.vo_rank)) if rank is not None)
    return compress_model(graph, statistics, plans, config.damping, components)


def with_own_model(graph: ModelGraph) -> ModelGraph:
    """The same weights under a model object of their own, so setting the cache leaves ``graph`` untouched.

    A shallow copy (with copies of the top-level module/parameter tables and of the generation config) is
    enough: stages never edit weights in place, and the cache setting lives on the generation config.
    """
    model = copy.copy(graph.model)
    for table in ("_modules", "_parameters", "_buffers"):
        model.__dict__[table] = dict(graph.model.__dict__[table])
    for patched in ("_prepare_cache_for_generation", "_a3q_cache_installed"):
        model.__dict__.pop(patched, None)
    model.generation_config = copy.deepcopy(graph.model.generation_config)
    return ModelGraph(**{**vars(graph), "model": model, "layers": copy.deepcopy(graph.layers), "history": list(graph.history)})


@register_stage("kv", KVConfig)
def kv(graph: ModelGraph, config: KVConfig, context) -> ModelGraph:
    bytes_before, per_layer_before = graph.kv_bytes_per_token(), graph.kv_bytes_per_layer()
    values_before = sum(layer.kv_values_per_token() for layer in graph.layers)
    bf16_before = values_before * 2
    metrics: dict[str, Any] = {"kv_bytes_per_token_before": bytes_before}
    if config.reduces_ranks():
        graph = as_a3_graph(graph)
        plans = plan_kv_ranks(graph, config)
        windows = context.calibration_windows(graph)
        started = time.perf_counter()
        statistics = collect_statistics(graph, windows, {"qk", "ov"}, config.batch_size)
        result, results = reduce_kv_ranks(graph, statistics, plans, config)
        result = with_own_model(result)  # compress_model shares the generation config with the input model
        values_after = sum(layer.kv_values_per_token() for layer in result.layers)
        first = plans[0]
        metrics.update(
            kv_rank_reduction=1 - values_after / values_before,
            ranks={"qk": first.qk, "vo": first.vo} if all(p == first for p in plans) else [[p.qk, p.vo] for p in plans],
            relative_error={c: [r.relative_error.get(c) for r in results] for c in ("qk", "ov")},
            decomposition_seconds=time.perf_counter() - started,
        )
    else:
        result = with_own_model(graph)
    if config.bits is not None:
        result.set_kv_cache(config.cache_setting())
    per_layer = result.kv_bytes_per_layer()
    after = sum(per_layer)
    metrics.update(
        kv_bytes_per_layer=per_layer,
        kv_bytes_per_layer_before=per_layer_before,
        kv_reduction=1 - after / bytes_before,
        kv_compression_vs_bf16=bf16_before / bf16_equivalent_bytes(result),
        kv_cache=result.kv_cache,
        note=_note(metrics, result, after, bf16_before / bf16_equivalent_bytes(result)),
    )
    context.metrics.update(metrics)
    return result


def bf16_equivalent_bytes(graph: ModelGraph) -> float:
    """KV bytes per token with full-precision caches counted at bf16 (how a model is deployed), quantized as is."""
    if graph.kv_cache is not None:
        return graph.kv_bytes_per_token()
    return sum(layer.kv_values_per_token() for layer in graph.layers) * 2.0


def _note(metrics: dict[str, Any], graph: ModelGraph, after: float, factor: float) -> str:
    parts = []
    if "ranks" in metrics:
        ranks = metrics["ranks"]
        sizes = f"qk={ranks['qk']} vo={ranks['vo']}" if isinstance(ranks, dict) else "per-layer ranks"
        parts.append(f"{sizes} (−{metrics['kv_rank_reduction']:.1%} KV values)")
    if graph.kv_cache is not None:
        parts.append(f"{graph.kv_cache['bits']}-bit cache")
    parts.append(f"{after:.0f} B/token, ×{factor:.2f} vs bf16")
    return ", ".join(parts)
