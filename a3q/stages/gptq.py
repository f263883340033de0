"""Stage ``gptq``: GPTQ quantization of the decoder linears, whatever their shapes (dense or after A³).

```yaml
- stage: gptq
  bits: 4              # 2, 3, 4 or 8
  group_size: 128      # -1: one group per row; a last, partial group is fine (A³ leaves e.g. 459 inputs)
  sym: true            # symmetric grid (zero point in the middle) or asymmetric
  act_order: static    # quantize columns by decreasing Hessian diagonal with the groups contiguous and their scales
                       # fixed from the original weights (llm-compressor's default; plain v1 checkpoint, desc_act
                       # false); true: groups in that order too (desc_act, g_idx records them); false: in order
  act_group_aware: false  # GAR: visit groups by decreasing max diag H, columns inside by diag H; groups stay
                          # contiguous (plain v1); exclusive with act_order (act_group_aware: true alone turns
                          # act_order off)
  mse: false          # search each group's clipping range (factors 1.00…0.80 of min/max) for the least error
  damp_percent: 0.01   # λ = damp_percent · mean(diag H) added to H
  damp_auto: false     # double the damping until the Cholesky succeeds (the values used are reported)
  true_sequential: false  # inside a layer: q/k/v, then o, then gate/up, then down, each group's Hessian taken
                          # from inputs that the already quantized groups before it produce
  block_size: 128      # columns per lazy-batch update
  skip_modules: []     # path fragments of decoder linears to keep in float, e.g. [mlp.down_proj, layers.0.]
```

Calibration is sequential (:mod:`a3q.pipeline.runner`): layer l's Hessians come from inputs produced by layers
0…l−1 as already quantized (and, with ``true_sequential``, by the groups of layer l quantized before). Right after ``a3`` (uniform allocation) both share that one pass. The LM head and the
embeddings are never quantized. Weights are stored in the GPTQ v1 layout (:class:`~a3q.quant.gptq_linear.GPTQLinear`);
a dense Llama-family model is exported with a Hugging Face ``quantization_config`` so transformers loads it with
gptqmodel installed.

Defaults are the best measured settings (docs/results.md, "GPTQ against llm-compressor"; SmolLM2, 4-bit g64,
Wikipedia and news text): ``act_order: static`` with ``damp_percent: 0.01`` gave the lowest perplexity dense (18.73
and 38.14 against 19.25 and 39.79 for ``act_group_aware`` + damp 0.05, the defaults before it) and after A³ on
news (92.45 against 95.21; on Wikipedia 36.40 against 36.07, within run-to-run noise), over three calibration
seeds it beats llm-compressor's default on both texts, and it takes no longer. ``true_sequential`` stays off: it
gained under 1% on the dense model, nothing after A³, and costs 50–60% more time. ``act_order: false,
act_group_aware: true, damp_percent: 0.05`` are the previous defaults; ``act_order: false, damp_percent: 0.01``
plain GPTQ.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from a3q.arch import LAYER_PREFIX, LINEAR_PATHS, SHARED_INPUTS, layer_linears
from a3q.arch.auto import is_a3_model
from a3q.arch.surgery import swap_module, with_separate_linears
from a3q.graph import ModelGraph
from a3q.pipeline.stage import CalibratingStage, StopLayer
from a3q.quant.gptq import HessianAccumulator, gptq_quantize
from a3q.quant.gptq_linear import SUPPORTED_BITS, GPTQLinear
from a3q.quant.gptq_linear import describe as describe_storage
from a3q.quant.gptq_order import ActOrder
from a3q.registry import StageConfig, register_stage

#: the input multiple that external GPTQ kernels (gptqmodel's CPU/GPU kernels) need per group
KERNEL_NOTE = "external GPTQ kernels need in_features % group_size == 0"


class GPTQConfig(StageConfig):
    """GPTQ settings; see the module docstring."""

    needs_calibration = True
    produces_quantized_weights = True
    requires_float_weights = True
    accepts_factored_linears = False

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: ActOrder = "static"
    act_group_aware: bool = False
    damp_percent: float = Field(0.01, gt=0.0, lt=1.0)
    damp_auto: bool = False
    mse: bool = False
    true_sequential: bool = False
    block_size: int = Field(128, ge=1)
    batch_size: int = Field(4, ge=1)
    skip_modules: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _act_group_aware_alone(cls, data):  # noqa: ANN001, ANN206 (pydantic hands the raw fields)
        """``act_group_aware: true`` alone means group-aware visiting: the default static act-order steps aside
        (the two reorder the same columns, so a recipe names one; naming both is refused below)."""
        if isinstance(data, dict) and data.get("act_group_aware") is True and "act_order" not in data:
            data = {**data, "act_order": False}
        return data

    @field_validator("act_group_aware")
    @classmethod
    def _one_reordering(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("act_order"):
            raise ValueError("act_order and act_group_aware are exclusive: act_order permutes the groups "
                             "(g_idx), act_group_aware only the visiting order inside fixed groups")
        return value

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value not in SUPPORTED_BITS:
            raise ValueError(f"must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {value}")
        return value

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"must be -1 (one group per row) or a positive size, got {value}")
        return value


@register_stage("gptq", GPTQConfig)
class GPTQStage(CalibratingStage):
    """GPTQ in the engine's pipeline: Hessians from each layer's inputs (sequential statistics), then quantize it.

    Each input group (q/k/v, o, gate/up, down) is quantized as one stacked weight with one Hessian. With
    ``true_sequential`` the groups are quantized in forward order, one per round: after each, :meth:`process` asks
    the pipeline for another look at the layer, and the next group's Hessian is measured with the groups before it
    already quantized (the observing hook stops the layer as soon as it has its input).
    """

    statistics = "sequential"
    checkpointed = CalibratingStage.checkpointed + ("errors", "damps", "quantized_paths", "kernel_refusals")

    def __init__(self, config: GPTQConfig) -> None:
        super().__init__()
        self.config, self.batch_size = config, config.batch_size
        self.hessians: dict[str, HessianAccumulator] = {}
        self.errors: list[dict[str, float]] = []
        self.damps: list[dict[str, float]] = []
        self.quantized_paths: list[str] = []
        self.kernel_refusals: list[str] = []
        self.forward_order: list[str] = []
        self.pending: list[str] | None = None  # groups of the current layer still to quantize (true-sequential)
        self.layer_errors: dict[str, float] = {}
        self.layer_damps: dict[str, float] = {}

    def begin(self, graph: ModelGraph) -> ModelGraph:
        return with_separate_linears(graph)

    def _targets(self, graph: ModelGraph, index: int) -> dict[str, dict[str, torch.nn.Module]]:
        """The float linears to quantize, grouped by shared input (q/k/v, gate/up): one Hessian per group."""
        prefix = LAYER_PREFIX[graph.family].format(index=index)
        linears = {
            short: module for short, module in layer_linears(graph.model, graph.family, index).items()
            if isinstance(module, torch.nn.Linear)
            and not any(fragment in prefix + LINEAR_PATHS[graph.family][short] for fragment in self.config.skip_modules)
        }
        groups = [{s: linears.pop(s) for s in shared if s in linears} for shared in SHARED_INPUTS[graph.family]]
        groups = [group for group in groups if group] + [{short: module} for short, module in linears.items()]
        return {"+".join(group): group for group in groups}

    def observe(self, graph: ModelGraph, index: int) -> list[Any]:
        groups = self._targets(graph, index)
        if self.pending is not None:  # a later round of true-sequential: the next group only, then stop the layer
            key = self.pending[0]
            first = next(iter(groups[key].values()))
            self.hessians[key] = HessianAccumulator(first.in_features)

            def measure(module, args, key=key):
                self.hessians[key].add(args[0])
                raise StopLayer

            return [first.register_forward_pre_hook(measure)]
        handles = []
        self.forward_order = []
        sequential = self.config.true_sequential
        for key, group in groups.items():
            first = next(iter(group.values()))
            self.hessians[key] = HessianAccumulator(first.in_features)

            def hook(module, args, key=key, count=len(groups)):
                if key not in self.forward_order:
                    self.forward_order.append(key)
                if not sequential or self.forward_order[0] == key:  # true-sequential: later groups are re-measured
                    self.hessians[key].add(args[0])
                if len(self.forward_order) == count and key == self.forward_order[-1]:
                    # every group has its input: the rest of the layer (down_proj's product, the residual) would
                    # only make an output the sequential stream never reads (issue 32: ~20% of this forward)
                    raise StopLayer

            handles.append(first.register_forward_pre_hook(hook))
        return handles

    def reduce_statistics(self, index: int, reduce) -> None:
        """Sum the Hessians just measured over every process, in one ``reduce`` call: the next group's only in a
        later true-sequential round, the first group's in the first one (the others are measured later), else all."""
        if self.pending is not None:
            keys = [self.pending[0]]
        elif self.config.true_sequential and self.forward_order:
            keys = [self.forward_order[0]]
        else:
            keys = sorted(self.hessians)
        HessianAccumulator.reduce_all([self.hessians[key] for key in keys], reduce)

    @torch.no_grad()
    def process(self, graph: ModelGraph, index: int) -> bool:
        """Quantize the next group(s); True asks the pipeline to observe this layer again (true-sequential)."""
        groups = self._targets(graph, index)
        if self.pending is None:
            # forward order (q/k/v, o, gate/up, down); groups the observation never reached keep their listed order
            self.pending = [k for k in self.forward_order if k in groups] + [k for k in groups if k not in self.forward_order]
            self.layer_errors, self.layer_damps = {}, {}
        while self.pending:
            key = self.pending.pop(0)
            self._quantize_group(graph, index, key, groups[key], self.hessians.pop(key))
            if self.config.true_sequential and self.pending:
                return True
        self.pending = None
        self.hessians.clear()
        self.errors.append(self.layer_errors)
        self.damps.append(self.layer_damps)
        return False

    def _quantize_group(self, graph: ModelGraph, index: int, key: str, group: dict[str, torch.nn.Module],
                        accumulator: HessianAccumulator) -> None:
        """Quantize one input group as one stacked weight: GPTQ treats output rows independently given H."""
        cfg = self.config
        stacked = torch.cat([module.weight for module in group.values()])
        result = gptq_quantize(stacked, accumulator.take_hessian(), cfg.bits, cfg.group_size, cfg.sym, cfg.act_order,
                               cfg.damp_percent, cfg.block_size, act_group_aware=cfg.act_group_aware,
                               damp_auto=cfg.damp_auto, mse=cfg.mse)
        if not math.isfinite(result.relative_error):
            raise FloatingPointError(
                f"layer {index} ({key}): GPTQ's relative error is {result.relative_error} "
                "(non-finite weights or calibration inputs)")
        self.layer_errors[key], self.layer_damps[key] = result.relative_error, result.damp_percent
        row = 0
        for short, module in group.items():
            rows = slice(row, row + module.out_features)
            row += module.out_features
            self._replace(graph, index, short, module, result.codes[rows], result.scales[:, rows],
                          result.zeros[:, rows], result.g_idx)

    def _replace(self, graph: ModelGraph, index: int, short: str, module: torch.nn.Linear, codes, scales, zeros, g_idx) -> None:
        cfg = self.config
        quantized = GPTQLinear(module.in_features, module.out_features, cfg.bits, cfg.group_size,
                               bias=module.bias is not None, dtype=module.weight.dtype, device=module.weight.device)
        quantized.set_codes(codes, scales, zeros, g_idx)
        if module.bias is not None:
            quantized.bias.copy_(module.bias)
        path = LAYER_PREFIX[graph.family].format(index=index) + LINEAR_PATHS[graph.family][short]
        swap_module(graph.model, path, quantized)
        self.quantized_paths.append(path)
        if cfg.group_size > 0 and module.in_features % cfg.group_size:
            self.kernel_refusals.append(f"{path} ({module.in_features} inputs)")

    def finish(self, graph: ModelGraph) -> ModelGraph:
        # recorded from the modules now: a stage sharing the pass may have rebuilt the graph's description
        for index, layer in enumerate(graph.layers):
            for short, module in layer_linears(graph.model, graph.family, index).items():
                if isinstance(module, GPTQLinear):
                    layer.quantized[short] = describe_storage(module)
        record_gptq_config(graph.model, self.config, self.quantized_paths, partial_groups=bool(self.kernel_refusals))
        worst = worst_error(self.errors)
        raised = sorted({d for layer in self.damps for d in layer.values() if d != self.config.damp_percent})
        cfg = self.config
        act_order = {True: "act-order", "static": "static act-order"}.get(cfg.act_order, "")
        options = [name for name, on in ((act_order, bool(cfg.act_order)), ("act-group-aware", cfg.act_group_aware),
                                          ("true-sequential", cfg.true_sequential), ("mse scales", cfg.mse)) if on]
        self.metrics = {
            "bits": cfg.bits,
            "group_size": cfg.group_size,
            "settings": {"sym": cfg.sym, "act_order": cfg.act_order, "act_group_aware": cfg.act_group_aware,
                         "damp_percent": cfg.damp_percent, "true_sequential": cfg.true_sequential,
                         **({"mse": True} if cfg.mse else {})},
            "quantized_linears": len(self.quantized_paths),
            "relative_error": self.errors,
            "worst_relative_error": worst,
            "damp_percent_used": self.damps,
            "note": f"{cfg.bits}-bit g{cfg.group_size}" + "".join(f", {o}" for o in options)
                    + f", damp {cfg.damp_percent:g}, worst layer error {worst:.2e}"
                    + (f"; damping raised to {', '.join(f'{d:g}' for d in raised)} in "
                       f"{sum(d != cfg.damp_percent for layer in self.damps for d in layer.values())} groups" if raised else "")
                    + (f"; {len(self.kernel_refusals)} linears with a partial group ({KERNEL_NOTE})" if self.kernel_refusals else ""),
        }
        if self.kernel_refusals:
            self.metrics["partial_groups"] = self.kernel_refusals
        return graph


def worst_error(errors: list[dict[str, float]]) -> float:
    """The largest relative error of any layer's group; NaN if any is NaN (Python's ``max`` would skip a NaN
    depending on where it sits), 0.0 when nothing was quantized."""
    values = [value for layer in errors for value in layer.values()]
    if any(math.isnan(value) for value in values):
        return math.nan
    return max(values, default=0.0)


def record_gptq_config(model: Any, config: GPTQConfig, paths: list[str], partial_groups: bool = False) -> None:
    """Write what a loader needs into the model config.

    ``a3q_gptq`` (read by a3q and by the remote-code modeling file) lists the quantized modules. Dense
    transformers classes also get the standard ``quantization_config`` so plain transformers (with gptqmodel)
    loads the checkpoint; a3q's own classes do not, since transformers would hand them to gptqmodel, whose
    kernels refuse the partial groups A³ shapes produce. A dense model with partial groups (e.g. 576 inputs in groups
    of 128) names gptqmodel's ``gptq_torch`` backend: its automatically chosen CPU kernel fails on them at the first
    forward, the torch one computes them correctly.
    """
    model.config.a3q_gptq = {"bits": config.bits, "group_size": config.group_size, "sym": config.sym,
                             "act_order": config.act_order, "act_group_aware": config.act_group_aware,
                             "true_sequential": config.true_sequential, "mse": config.mse, "modules": list(paths)}
    if not is_a3_model(model):
        model.config.quantization_config = {
            "quant_method": "gptq", "bits": config.bits, "group_size": config.group_size,
            "desc_act": config.act_order is True, "sym": config.sym, "damp_percent": config.damp_percent,
            "checkpoint_format": "gptq", "true_sequential": config.true_sequential,
        }
        if partial_groups:
            model.config.quantization_config["backend"] = "gptq_torch"
