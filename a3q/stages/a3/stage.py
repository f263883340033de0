"""Stage ``a3``: A³ closed-form compression of QK, OV and MLP (arXiv 2505.12942).

```yaml
- stage: a3
  ratio: 0.2                # remove 20% of every enabled component (= of decoder linear weights)
  components: [qk, ov, mlp] # ablations: any subset
  # per-component ratios (qk/ov/mlp) or explicit ranks (qk_rank/vo_rank/ff_rank) override ratio
  rank_multiple: 1          # round ranks down to a multiple (8 or 32 suit GPU kernels)
  damping: 1.0e-6           # δ·mean(diag G)·I added to head-space statistics
  allocation: global        # mixed ranks per layer/component at the same budget (the default with ratios);
                            # uniform: the same ranks in every layer (the default with qk_rank/vo_rank/ff_rank)
  max_shift: 0.3            # global: each layer's component keeps within ±max_shift of the uniform fraction
  mix_components: false     # global: also move budget between qk/ov/mlp (off: each keeps its own budget)
  probe_windows: 2          # global: calibration windows (of probe_seq_len tokens) per sensitivity probe
  probe_seq_len: 256
  qk_norm: post_norm        # families with per-head q/k norms (Gemma 3, Qwen3): keep (QK whole), pre_norm or post_norm
                            # (which moments choose the kept RoPE pairs; see a3q.stages.a3.qk_norm); the default is
                            # post_norm with global ranks and pre_norm with uniform ones (the best measured of each)
  statistics: dense         # each layer's statistics from the model as the stage found it (the paper's protocol),
                            # or sequential: from the layers before it as already compressed (shared with GPTQ)
  head_dims: any            # vllm-cpu or flash: q/k and v/o take one head size that backend's attention runs, so
                            # a server keeps the whole KV saving (no padding; docs/serving.md), at the same budget
```

``allocation: global`` spends the uniform plan's parameter budget where the measured loss per removed
parameter is smallest (see :mod:`a3q.stages.a3.allocation`): one KL probe per layer and component,
then a greedy over the closed-form error curves scaled by those probes. The report row lists the ranks of
every layer and the measured sensitivities. It is the default because it was better than uniform ranks at every
ratio measured (10/20/30%), on both real models and on both held-out texts (Wikipedia and news: 13–40% lower
perplexity; docs/results.md, "Defaults"); its probes make the stage about ten times slower on SmolLM2 (minutes, not
seconds, on a CPU). ``allocation: uniform`` is the previous behaviour.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from a3q.arch import FAMILIES
from a3q.arch.surgery import as_a3_graph, redescribe
from a3q.graph import ModelGraph
from a3q.io.model_folder import config_json, text_field
from a3q.registry import StageConfig, register_stage
from a3q.stages.a3.allocation import plan_global_ranks
from a3q.stages.a3.apply import qk_norm_setting
from a3q.stages.a3.layer_stage import HeadSpaceCompression
from a3q.stages.a3.ranks import HEAD_DIM_GRIDS, allowed_head_dims, plan_ranks

Component = Literal["qk", "ov", "mlp"]
_RANK_FIELD = {"qk": "qk_rank", "ov": "vo_rank", "mlp": "ff_rank"}


class A3Config(StageConfig):
    """Budget and switches of the A³ stage; see the module docstring."""

    needs_calibration = True
    requires_float_weights = True
    accepts_factored_linears = False

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
    allocation: Literal["uniform", "global"] = "global"  # uniform when explicit ranks are given (see _allocation)
    max_shift: float = Field(0.3, gt=0.0, lt=1.0)  # best measured of 0.1/0.2/0.3/unbounded at 10/20/30% (README)
    mix_components: bool = False
    probe_windows: int = Field(2, ge=1)
    probe_seq_len: int = Field(256, ge=2)
    statistics: Literal["dense", "sequential"] = "dense"
    qk_norm: Literal["keep", "pre_norm", "post_norm"] = "post_norm"  # pre_norm with uniform ranks (_measured_defaults)
    head_dims: Literal["any", "vllm-cpu", "flash"] = "any"  # one q/k = v/o head size a backend runs unpadded

    def model_problems(self, model: str, revision: str | None) -> list[str]:
        """``head_dims`` against the model's head size (from its config.json, before anything loads): the backend
        must run some size up to it."""
        if self.head_dims == "any":
            return []
        config = config_json(model, revision)
        hidden, heads = text_field(config, "hidden_size"), text_field(config, "num_attention_heads")
        head_dim = text_field(config, "head_dim") or (hidden // heads if hidden and heads else None)
        if head_dim is not None and not allowed_head_dims(self.head_dims, head_dim):
            return [f"head_dims: {self.head_dims} runs no head size up to the model's {head_dim} (sizes: "
                    f"{', '.join(map(str, HEAD_DIM_GRIDS[self.head_dims][:4]))}, …)"]
        return []

    def changes_kv_ranks(self) -> bool:
        return "qk" in self.components or "ov" in self.components

    def check_in_recipe(self, earlier) -> list[str]:
        kv_ranks = [spec for spec in earlier if spec.config.changes_kv_ranks()]
        if kv_ranks and ("qk" in self.components or "ov" in self.components):
            return [f"a3 reduces q/k or v/o ranks after {kv_ranks[0].label} already did: put a3 first (kv budgets are relative to the cache a3 leaves)"]
        return []

    @model_validator(mode="before")
    @classmethod
    def _measured_defaults(cls, data):  # noqa: ANN001, ANN206 (pydantic hands the raw fields)
        """Global ranks by default; explicit ranks (qk_rank, vo_rank, ff_rank) are uniform by nature. The q/k-norm
        mode that measured best depends on the allocation (Gemma-3-270M, docs/results.md "Defaults"): post_norm with
        global ranks (better in 5 of 6 ratio × text cases), pre_norm with uniform ones."""
        if not isinstance(data, dict):
            return data
        if "allocation" not in data and any(data.get(f) is not None for f in _RANK_FIELD.values()):
            data = {**data, "allocation": "uniform"}
        if "qk_norm" not in data:
            data = {**data, "qk_norm": "pre_norm" if data.get("allocation", "global") == "uniform" else "post_norm"}
        return data

    @model_validator(mode="after")
    def _budget_is_complete(self) -> A3Config:
        if len(set(self.components)) != len(self.components):
            raise ValueError("components: each of qk, ov, mlp may appear once")
        for component in ("qk", "ov", "mlp"):
            enabled = component in self.components
            given = getattr(self, component) is not None or getattr(self, _RANK_FIELD[component]) is not None
            if given and not enabled:
                raise ValueError(f"{component}: a budget is given but '{component}' is not in components")
            if enabled and not given and self.ratio is None:
                raise ValueError(f"{component}: no budget: set ratio, {component} or {_RANK_FIELD[component]}")
        if self.allocation == "global" and any(getattr(self, f) is not None for f in _RANK_FIELD.values()):
            raise ValueError("allocation: global chooses the ranks itself; give ratios, not qk_rank/vo_rank/ff_rank")
        if self.head_dims != "any":
            if not {"qk", "ov"} <= set(self.components):
                raise ValueError(f"head_dims: {self.head_dims} gives q/k and v/o one head size: components must "
                                 f"hold both qk and ov")
            if self.qk_norm == "keep":
                raise ValueError(f"head_dims: {self.head_dims} compresses q/k, which qk_norm: keep keeps whole")
            if self.rank_multiple != 1:
                raise ValueError(f"head_dims: {self.head_dims} picks head sizes from the backend's grid: leave "
                                 f"rank_multiple at 1")
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
class A3Stage(HeadSpaceCompression):
    """A³ in the engine's pipeline: head-space statistics per layer, then each layer rebuilt at its new sizes.

    With ``statistics: dense`` a layer's statistics come from the model as the stage found it (the paper's
    protocol); with ``sequential`` from the layers before it as already compressed (and quantized, when GPTQ shares
    the pass), so each layer is fitted to what it will see. ``allocation: global`` first observes every layer, then
    plans the ranks with probes (:mod:`a3q.stages.a3.allocation`), then compresses.
    """

    def __init__(self, config: A3Config) -> None:
        super().__init__(frozenset(config.components), config.damping, config.statistics, config.batch_size)
        self.config = config
        self.qk_norm_mode = config.qk_norm

    def needs_plan(self) -> bool:
        return self.config.allocation == "global"

    def probe_windows(self, windows):
        return windows[: self.config.probe_windows, : self.config.probe_seq_len]

    def begin(self, graph: ModelGraph) -> ModelGraph:
        graph = as_a3_graph(graph)
        if FAMILIES[graph.family].qk_norm_paths is not None and self.config.qk_norm == "keep":
            self.components = self.components - {"qk"}
        self.params_before, self.kv_before = graph.decoder_linear_params(), graph.kv_bytes_per_token()
        ratios, explicit = self.config.component_ratios(), self.config.explicit_ranks()
        if "qk" not in self.components:
            ratios["qk"] = explicit["qk"] = None
        self.plans = plan_ranks(graph.layers, ratios, explicit, self.config.rank_multiple, graph.uses_rope,
                                self.config.head_dims)
        return graph

    def plan(self, graph: ModelGraph, probe) -> None:
        statistics = [self.layer_statistics[index] for index in range(len(graph.layers))]
        for layer_statistics in statistics:
            layer_statistics.finish()
        ratios = self.config.component_ratios()
        if "qk" not in self.components:  # qk_norm: keep
            ratios["qk"] = None
        allocation = plan_global_ranks(graph, statistics, ratios, probe, self.config.rank_multiple,
                                       self.config.damping, self.config.max_shift, self.config.mix_components,
                                       qk_norm=qk_norm_setting(graph, self.qk_norm_mode),
                                       head_dims=self.config.head_dims)
        self.plans = allocation.plans
        self.metrics["sensitivity"] = allocation.sensitivity

    def finish(self, graph: ModelGraph) -> ModelGraph:
        compressed = redescribe(graph)
        self.metrics.update(a3_metrics(self.config, self.plans, self.relative_errors, compressed, self.params_before,
                                       self.kv_before))
        self.metrics.update(statistics=self.config.statistics, allocation=self.config.allocation,
                            head_dims=self.config.head_dims,
                            calibration_tokens=self.calibration_tokens)
        return compressed


def a3_metrics(config: A3Config, plans, relative_errors, compressed, params_before: int, kv_before: float) -> dict:
    """The report fields of an A³ run: achieved ratio, ranks, per-component relative errors, a short note."""
    params_after = compressed.decoder_linear_params()
    first = plans[0]
    uniform = all(plan == first for plan in plans)
    return dict(
        achieved_ratio=1 - params_after / params_before,
        params_before=params_before,
        kv_bytes_per_token_before=kv_before,
        ranks={"qk": first.qk, "vo": first.vo, "ff": first.ff} if uniform else [vars(p) for p in plans],
        relative_error={c: [errors.get(c) for errors in relative_errors] for c in config.components},
        note=f"ρ={1 - params_after / params_before:.3f} " + (
            f"qk={first.qk} vo={first.vo} ff={first.ff}" if uniform else _ranges(plans)
        ),
    )


def _ranges(plans) -> str:
    """``qk=a–b vo=c–d ff=e–f`` across layers, for the note of a mixed-rank plan."""
    return " ".join(f"{name}={min(getattr(p, key) for p in plans)}–{max(getattr(p, key) for p in plans)}"
                    for name, key in (("qk", "qk"), ("vo", "vo"), ("ff", "ff")))
