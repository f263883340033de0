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

from typing import Any, Literal

from pydantic import Field, model_validator

from a3q.arch.surgery import as_a3_graph, redescribe
from a3q.graph import LayerStructure, ModelGraph
from a3q.registry import StageConfig, register_stage
from a3q.stages.a3.layer_stage import HeadSpaceCompression
from a3q.stages.a3.ranks import LayerRanks, plan_ranks, round_rank

_CACHE_FIELDS = ("group_size", "residual", "key_axis")


class KVConfig(StageConfig):
    """KV budget (``kv_ratio`` or ``qk_rank``/``vo_rank``) and quantized-cache setting; see the module docstring."""

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]  (only rank reduction calibrates)
        return self.reduces_ranks()

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

    def changes_kv_ranks(self) -> bool:
        return self.reduces_ranks()

    def quantizes_kv_cache(self) -> bool:
        return self.bits is not None

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
            if config.changes_kv_ranks():
                for name in ("qk_rank", "vo_rank"):
                    mine, theirs = getattr(self, name), getattr(config, name, None)
                    if mine is not None and theirs is not None and mine > theirs:
                        problems.append(f"{name}: {mine} exceeds the {name} {theirs} that {spec.label} leaves")
            if self.quantizes_kv_cache() and config.quantizes_kv_cache():
                problems.append(f"bits: the cache is already quantized by {spec.label}; set bits in one kv stage")
        return problems


def plan_kv_ranks(graph: ModelGraph, config: KVConfig) -> list[LayerRanks]:
    """Per-layer q/k and v/o sizes for the budget; the MLP keeps its size."""
    return plan_kv_layer_ranks(graph.layers, config, graph.uses_rope)


def plan_kv_layer_ranks(layers: list[LayerStructure], config: KVConfig, rope: bool) -> list[LayerRanks]:
    """:func:`plan_kv_ranks` from the layers' sizes alone (``a3q search`` sizes candidates from config.json)."""
    if config.kv_ratio is None:
        explicit = {"qk": config.qk_rank, "ov": config.vo_rank, "mlp": None}
        return plan_ranks(layers, {}, explicit, config.rank_multiple, rope)
    ratio = config.kv_ratio
    qk_plans = plan_ranks(layers, {"qk": ratio}, {}, config.rank_multiple, rope)
    plans = []
    for layer, plan in zip(layers, qk_plans):
        keep_total = (1 - ratio) * (layer.qk_head_dim + layer.vo_head_dim)
        vo = round_rank(keep_total - plan.qk, layer.vo_head_dim, config.rank_multiple, even=False)
        plans.append(LayerRanks(qk=plan.qk, vo=vo, ff=layer.intermediate_size))
    return plans


@register_stage("kv", KVConfig)
class KVStage(HeadSpaceCompression):
    """Fewer key/value dims (A³'s QK and OV solutions at the KV budget) and/or a quantized cache.

    Rank reduction observes through the pipeline with statistics of the model as this stage finds it (``dense``);
    a stage that only sets ``bits`` does not calibrate.
    """

    def __init__(self, config: KVConfig) -> None:
        if config.kv_ratio is not None:
            components = frozenset({"qk", "ov"})
        else:
            components = frozenset(c for c, rank in (("qk", config.qk_rank), ("ov", config.vo_rank)) if rank is not None)
        super().__init__(components, config.damping, "dense", config.batch_size)
        self.config = config

    def calibrates(self) -> bool:
        return self.config.reduces_ranks()

    def begin(self, graph: ModelGraph) -> ModelGraph:
        self.bytes_before, self.per_layer_before = graph.kv_bytes_per_token(), graph.kv_bytes_per_layer()
        self.values_before = sum(layer.kv_values_per_token() for layer in graph.layers)
        if self.config.reduces_ranks():
            graph = as_a3_graph(graph)
            self.plans = plan_kv_ranks(graph, self.config)
        return graph

    def finish(self, graph: ModelGraph) -> ModelGraph:
        metrics: dict[str, Any] = {"kv_bytes_per_token_before": self.bytes_before}
        if self.config.reduces_ranks():
            graph = redescribe(graph)
            values_after = sum(layer.kv_values_per_token() for layer in graph.layers)
            first = self.plans[0]
            metrics.update(
                kv_rank_reduction=1 - values_after / self.values_before,
                ranks={"qk": first.qk, "vo": first.vo} if all(p == first for p in self.plans)
                else [[p.qk, p.vo] for p in self.plans],
                relative_error={c: [errors.get(c) for errors in self.relative_errors] for c in ("qk", "ov")},
            )
        if self.config.bits is not None:
            graph.set_kv_cache(self.config.cache_setting())
        per_layer = graph.kv_bytes_per_layer()
        after = sum(per_layer)
        bf16_before = self.values_before * 2
        factor = bf16_before / bf16_equivalent_bytes(graph)
        metrics.update(
            kv_bytes_per_layer=per_layer,
            kv_bytes_per_layer_before=self.per_layer_before,
            kv_reduction=1 - after / self.bytes_before,
            kv_compression_vs_bf16=factor,
            kv_cache=graph.kv_cache,
            note=_note(metrics, graph, after, factor),
        )
        self.metrics.update(metrics)
        return graph


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
