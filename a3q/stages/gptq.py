"""Stage ``gptq``: GPTQ quantization of the decoder linears, whatever their shapes (dense or after A³).

```yaml
- stage: gptq
  bits: 4              # 2, 3, 4 or 8
  group_size: 128      # -1: one group per row; a last, partial group is fine (A³ leaves e.g. 459 inputs)
  sym: true            # symmetric grid (zero point in the middle) or asymmetric
  act_order: false     # quantize columns by decreasing Hessian diagonal (g_idx records the groups)
  damp_percent: 0.01   # λ = damp_percent · mean(diag H) added to H
  block_size: 128      # columns per lazy-batch update
  skip_modules: []     # path fragments of decoder linears to keep in float, e.g. [mlp.down_proj, layers.0.]
```

Calibration is sequential (:mod:`a3q.calib.layerwise`): layer l's Hessians come from inputs produced by layers
0…l−1 as already quantized. Right after ``a3`` (uniform allocation) both share that one pass. The LM head and the
embeddings are never quantized. Weights are stored in the GPTQ v1 layout (:class:`~a3q.quant.gptq_linear.GPTQLinear`);
a dense Llama-family model is exported with a Hugging Face ``quantization_config`` so transformers loads it with
gptqmodel installed.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator

from a3q.arch import LAYER_PREFIX, LINEAR_PATHS, SHARED_INPUTS, layer_linears
from a3q.calib.layerwise import LayerwiseStage, run_layerwise
from a3q.graph import ModelGraph
from a3q.quant.gptq import HessianAccumulator, gptq_quantize
from a3q.quant.gptq_linear import SUPPORTED_BITS, GPTQLinear
from a3q.quant.gptq_linear import describe as describe_storage
from a3q.registry import StageConfig, register_layerwise, register_stage
from a3q.stages.a3.apply import with_separate_linears

#: the input multiple that external GPTQ kernels (gptqmodel's CPU/GPU kernels) need per group
KERNEL_NOTE = "external GPTQ kernels need in_features % group_size == 0"


class GPTQConfig(StageConfig):
    """GPTQ settings; see the module docstring."""

    needs_calibration = True
    produces_quantized_weights = True
    requires_float_weights = True

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    damp_percent: float = Field(0.01, gt=0.0, lt=1.0)
    block_size: int = Field(128, ge=1)
    batch_size: int = Field(4, ge=1)
    skip_modules: list[str] = Field(default_factory=list)

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


class GPTQLayerwise(LayerwiseStage):
    """GPTQ's part of a layer-by-layer pass: Hessians from each layer's inputs, then quantize that layer."""

    name = "gptq"

    def __init__(self, config: GPTQConfig) -> None:
        super().__init__()
        self.config = config
        self.hessians: dict[str, HessianAccumulator] = {}
        self.errors: list[dict[str, float]] = []
        self.quantized_paths: list[str] = []
        self.kernel_refusals: list[str] = []

    def begin(self, graph: ModelGraph) -> ModelGraph:
        return with_separate_linears(graph)

    def _targets(self, graph: ModelGraph, index: int) -> list[dict[str, torch.nn.Module]]:
        """The float linears to quantize, grouped by shared input (q/k/v, gate/up): one Hessian per group."""
        prefix = LAYER_PREFIX[graph.family].format(index=index)
        linears = {
            short: module for short, module in layer_linears(graph.model, graph.family, index).items()
            if isinstance(module, torch.nn.Linear)
            and not any(fragment in prefix + LINEAR_PATHS[graph.family][short] for fragment in self.config.skip_modules)
        }
        groups = [{s: linears.pop(s) for s in shared if s in linears} for shared in SHARED_INPUTS[graph.family]]
        return [group for group in groups if group] + [{short: module} for short, module in linears.items()]

    def observe(self, graph: ModelGraph, index: int) -> list[Any]:
        handles = []
        for group in self._targets(graph, index):
            key = "+".join(group)
            first = next(iter(group.values()))
            self.hessians[key] = HessianAccumulator(first.in_features)
            handles.append(first.register_forward_pre_hook(lambda m, args, acc=self.hessians[key]: acc.add(args[0])))
        return handles

    @torch.no_grad()
    def process(self, graph: ModelGraph, index: int) -> None:
        """Quantize each input group as one stacked weight: GPTQ treats output rows independently given H."""
        cfg = self.config
        errors = {}
        for group in self._targets(graph, index):
            key = "+".join(group)
            stacked = torch.cat([module.weight for module in group.values()])
            result = gptq_quantize(stacked, self.hessians.pop(key).hessian(), cfg.bits, cfg.group_size,
                                   cfg.sym, cfg.act_order, cfg.damp_percent, cfg.block_size)
            errors[key] = result.relative_error
            row = 0
            for short, module in group.items():
                rows = slice(row, row + module.out_features)
                row += module.out_features
                self._replace(graph, index, short, module, result.codes[rows], result.scales[:, rows],
                              result.zeros[:, rows], result.g_idx)
        self.errors.append(errors)

    def _replace(self, graph: ModelGraph, index: int, short: str, module: torch.nn.Linear, codes, scales, zeros, g_idx) -> None:
        cfg = self.config
        quantized = GPTQLinear(module.in_features, module.out_features, cfg.bits, cfg.group_size,
                               bias=module.bias is not None, dtype=module.weight.dtype, device=module.weight.device)
        quantized.set_codes(codes, scales, zeros, g_idx)
        if module.bias is not None:
            quantized.bias.copy_(module.bias)
        path = LAYER_PREFIX[graph.family].format(index=index) + LINEAR_PATHS[graph.family][short]
        parent, _, name = path.rpartition(".")
        setattr(graph.model.get_submodule(parent), name, quantized)
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
        worst = max((e for layer in self.errors for e in layer.values()), default=0.0)
        self.metrics = {
            "bits": self.config.bits,
            "group_size": self.config.group_size,
            "quantized_linears": len(self.quantized_paths),
            "relative_error": self.errors,
            "note": f"{self.config.bits}-bit g{self.config.group_size}, worst layer error {worst:.2e}"
                    + (f"; {len(self.kernel_refusals)} linears with a partial group ({KERNEL_NOTE})" if self.kernel_refusals else ""),
        }
        if self.kernel_refusals:
            self.metrics["partial_groups"] = self.kernel_refusals
        return graph


def record_gptq_config(model: Any, config: GPTQConfig, paths: list[str], partial_groups: bool = False) -> None:
    """Write what a loader needs into the model config.

    ``a3q_gptq`` (read by a3q and by the remote-code modeling file) lists the quantized modules. Dense
    transformers classes also get the standard ``quantization_config`` so plain transformers (with gptqmodel)
    loads the checkpoint; a3q's own classes do not, since transformers would hand them to gptqmodel, whose
    kernels refuse the partial groups A³ shapes produce. A dense model with partial groups (e.g. 576 inputs in groups
    of 128) names gptqmodel's ``gptq_torch`` backend: its automatically chosen CPU kernel fails on them at the first
    forward, the torch one computes them correctly.
    """
    from a3q.modeling import is_a3_model

    model.config.a3q_gptq = {"bits": config.bits, "group_size": config.group_size, "sym": config.sym,
                             "act_order": config.act_order, "modules": list(paths)}
    if not is_a3_model(model):
        model.config.quantization_config = {
            "quant_method": "gptq", "bits": config.bits, "group_size": config.group_size,
            "desc_act": config.act_order, "sym": config.sym, "damp_percent": config.damp_percent,
            "checkpoint_format": "gptq", "true_sequential": False,
        }
        if partial_groups:
            model.config.quantization_config["backend"] = "gptq_torch"


@register_layerwise("gptq")
def gptq_layerwise(config: GPTQConfig) -> GPTQLayerwise:
    return GPTQLayerwise(config)


@register_stage("gptq", GPTQConfig)
def gptq(graph: ModelGraph, config: GPTQConfig, context) -> ModelGraph:
    part = GPTQLayerwise(config)
    graph = run_layerwise(graph, context.calibration_windows(graph), [part], config.batch_size)
    context.metrics.update(part.metrics)
    return graph
