"""Stage ``a3``: A³ closed-form compression of QK, OV and MLP (arXiv 2505.12942).

```yaml
- stage: a3
  ratio: 0.2                # remove 20% of every enabled component (= of decoder linear weights)
  components: [qk, ov, mlp] # ablations: any subset
  # per-component ratios (qk/ov/mlp) or explicit ranks (qk_rank/vo_rank/ff_rank) override ratio
  rank_multiple: 1          # round ranks down to a multiple (8 or 32 suit GPU kernels)
  damping: 1.0e-6           # δ·mean(diag G)·I added to head-space statistics
```
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field, model_validator

from a3q.registry import StageConfig, register_stage
from a3q.stages.a3.apply import as_a3_graph, compress_model
from a3q.stages.a3.ranks import plan_ranks
from a3q.stages.a3.statistics import collect_statistics

Component = Literal["qk", "ov", "mlp"]
_RANK_FIELD = {"qk": "qk_rank", "ov": "vo_rank", "mlp": "ff_rank"}


class A3Config(StageConfig):
    """Budget and switches of the A³ stage; see the module docstring."""

    needs_calibration = True
    requires_float_weights = True

    ratio: float | None = Field(None, ge=0.0, lt=1.0)
    qk: float | None = Field(None, ge=0.0, lt=1.0)
    ov: float | None = Field(None, ge=0.0, lt=1.0)
    mlp: float | None = Field(None, ge=0.0, lt=1.0)
    qk_rank: int | None = Field(None, ge=1)
    vo_rank: int | None = Field(None, ge=1)
    ff_rank: int | None = Field(None, ge=1)
    components: list[Component] = Field(default_factory=lambda: ["qk", "ov", "mlp"], min_length=1)
    rank_multiple: int = Field(1, ge=1, le=1024)
    damping: float = Field(1e-6, ge=0.0, le=1.0)
    batch_size: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _budget_is_complete(self) -> "A3Config":
        if len(set(self.components)) != len(self.components):
            raise ValueError("components: each of qk, ov, mlp may appear once")
        for component in ("qk", "ov", "mlp"):
            enabled = component in self.components
            given = getattr(self, component) is not None or getattr(self, _RANK_FIELD[component]) is not None
            if given and not enabled:
                raise ValueError(f"{component}: a budget is given but '{component}' is not in components")
            if enabled and not given and self.ratio is None:
                raise ValueError(f"{component}: no budget: set ratio, {component} or {_RANK_FIELD[component]}")
        return self

    def component_ratios(self) -> dict[str, float | None]:
        """Each enabled component's ratio: its own field if set, else ``ratio``; None when disabled."""
        ratios: dict[str, float | None] = {}
        for component in ("qk", "ov", "mlp"):
            own = getattr(self, component)
            ratios[component] = (own if own is not None else self.ratio) if component in self.components else None
        return ratios

    def explicit_ranks(self) -> dict[str, int | None]:
        return {c: getattr(self, _RANK_FIELD[c]) for c in ("qk", "ov", "mlp")}


@register_stage("a3", A3Config)
def a3(graph, config: A3Config, context):
    graph = as_a3_graph(graph)
    params_before = graph.decoder_linear_params()
    kv_before = graph.kv_bytes_per_token()
    plans = plan_ranks(graph.layers, config.component_ratios(), config.explicit_ranks(), config.rank_multiple, graph.uses_rope)
    windows = context.calibration_windows(graph)
    started = time.perf_counter()
    statistics = collect_statistics(graph, windows, set(config.components), config.batch_size)
    calibrated = time.perf_counter()
    compressed, results = compress_model(graph, statistics, plans, config.damping, frozenset(config.components))
    finished = time.perf_counter()
    params_after = compressed.decoder_linear_params()
    errors = {c: [r.relative_error.get(c) for r in results] for c in config.components}
    first = plans[0]
    uniform = all(plan == first for plan in plans)
    context.metrics.update(
        achieved_ratio=1 - params_after / params_before,
        params_before=params_before,
        kv_bytes_per_token_before=kv_before,
        ranks={"qk": first.qk, "vo": first.vo, "ff": first.ff} if uniform else [vars(p) for p in plans],
        calibration_seconds=calibrated - started,
        decomposition_seconds=finished - calibrated,
        calibration_tokens=int(windows.numel()),
        relative_error=errors,
        note=f"ρ={1 - params_after / params_before:.3f} qk={first.qk} vo={first.vo} ff={first.ff}",
    )
    return compressed
