"""Stage ``bnb``: bitsandbytes quantization of the decoder linears (NF4/FP4 4-bit or LLM.int8()), on CPU.

```yaml
- stage: bnb
  quant_type: nf4          # nf4 | fp4 | int8
  double_quant: true       # 4-bit: quantize the per-block scales again (8-bit codes, one float per 256 scales)
  compute_dtype: float32   # 4-bit: float32 | bfloat16 | float16 (weights are dequantized to it for the matmul)
  blocksize: 64            # 4-bit: weights per scale (32 … 4096, powers of two)
  threshold: 6.0           # int8: LLM.int8() outlier threshold on activations (0: no float16 columns)
  skip_modules: [lm_head]  # path fragments of decoder linears to keep in float, e.g. [mlp.down_proj, layers.0.]
```

Round to nearest, no calibration: every decoder linear (q, k, v, o, gate, up, down, whatever shapes A³ left) becomes
a ``bitsandbytes.nn.Linear4bit`` / ``Linear8bitLt`` holding its quantized weight; biases stay float. The LM head and
the embeddings are never quantized. The model gets a Hugging Face ``quantization_config`` (``BitsAndBytesConfig``),
so an exported artifact loads back as the same bitsandbytes modules with ``a3q.load`` and, without a3q, with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. See :mod:`a3q.quant.bnb` for the bytes
stored and :mod:`a3q.modeling.a3q_bnb_cpu` for bitsandbytes' CPU problems (a3q computes every shape exactly; the
report lists the linears whose ``in_features`` is not a multiple of ``blocksize``, which plain bitsandbytes on CPU
mishandles).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from a3q.arch import LAYER_PREFIX, LINEAR_PATHS, layer_linears
from a3q.arch.surgery import swap_module, with_separate_linears
from a3q.graph import ModelGraph
from a3q.modeling.a3q_bnb_cpu import rows_split_blocks
from a3q.quant import bnb as bnb_format
from a3q.registry import StageConfig, register_stage

FOUR_BIT_FIELDS = ("double_quant", "compute_dtype", "blocksize")
INT8_FIELDS = ("threshold",)


class BnbConfig(StageConfig):
    """bitsandbytes settings; see the module docstring."""

    def offload_problem(self) -> str | None:
        return "bitsandbytes converts the whole model in memory: use offload: none"

    produces_quantized_weights = True
    requires_float_weights = True
    accepts_factored_linears = False

    quant_type: Literal["nf4", "fp4", "int8"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = 64
    threshold: float = Field(6.0, ge=0.0)
    skip_modules: list[str] = Field(default_factory=lambda: ["lm_head"])

    @model_validator(mode="after")
    def _fields_match_quant_type(self) -> BnbConfig:
        four_bit = self.quant_type != "int8"
        for name in INT8_FIELDS if four_bit else FOUR_BIT_FIELDS:
            if name in self.model_fields_set:
                applies = "int8" if four_bit else "4-bit (nf4, fp4)"
                raise ValueError(f"{name}: only applies to {applies} quantization, not quant_type {self.quant_type}")
        if any(not fragment for fragment in self.skip_modules):
            raise ValueError("skip_modules: empty fragment (it would match every linear)")
        return self

    def check_in_recipe(self, earlier: list[Any]) -> list[str]:
        problems = []
        return problems

    def short_note(self) -> str:
        if self.quant_type == "int8":
            return f"int8 (LLM.int8, threshold {self.threshold:g})"
        return (f"{self.quant_type}{' double-quant' if self.double_quant else ''} "
                f"block {self.blocksize}, compute {self.compute_dtype}")


def quantize_graph(graph: ModelGraph, config: BnbConfig) -> tuple[list[str], list[str]]:
    """Replace the decoder linears in place; returns the module paths (quantized, kept in float)."""
    from torch import nn

    quantized: list[str] = []
    kept: list[str] = []
    for index, layer in enumerate(graph.layers):
        prefix = LAYER_PREFIX[graph.family].format(index=index)
        for short, module in layer_linears(graph.model, graph.family, index).items():
            path = prefix + LINEAR_PATHS[graph.family][short]
            if any(fragment in path for fragment in config.skip_modules):
                kept.append(path)
                continue
            if type(module) is not nn.Linear:
                raise TypeError(f"{path} is a {type(module).__name__}, not a float nn.Linear; bnb quantizes float linears")
            replacement = bnb_format.quantize_linear(
                module, config.quant_type, config.double_quant, config.compute_dtype, config.blocksize, config.threshold
            )
            swap_module(graph.model, path, replacement)
            layer.quantized[short] = bnb_format.describe(replacement)
            quantized.append(path)
    return quantized, kept


@register_stage("bnb", BnbConfig)
def bnb(graph: ModelGraph, config: BnbConfig, context) -> ModelGraph:
    graph = with_separate_linears(graph)
    float_bytes = graph.decoder_linear_bytes()
    float_weights = graph.decoder_linear_params()
    quantized, kept = quantize_graph(graph, config)
    # the LM head is never quantized: it is named in the skip list whatever the config says, since an explicit list
    # replaces transformers' default skips when it loads the artifact
    skip = ["lm_head", *kept]
    hf_config = bnb_format.quantization_config(
        config.quant_type, config.double_quant, config.compute_dtype, config.threshold, skip
    )
    bnb_format.mark_quantized(graph.model, hf_config)
    stored = graph.decoder_linear_bytes()
    kept_weights = sum(
        fan_in * fan_out
        for layer in graph.layers
        for short, (fan_in, fan_out) in layer.linear_shapes(graph.hidden_size).items()
        if short not in layer.quantized
    )
    quantized_weights = float_weights - kept_weights
    split = _rows_split_blocks(graph, quantized) if config.quant_type != "int8" else []
    quantized_bytes = stored - 2 * kept_weights
    bits = 8 * quantized_bytes / quantized_weights if quantized_weights else 0.0
    context.metrics.update(
        quant_type=config.quant_type,
        quantized_linears=len(quantized),
        float_linears=kept,
        bits_per_weight=bits,
        weight_bytes_before=float_bytes,
        note=f"{config.short_note()}: {len(quantized)} linears, {bits:.3f} bits/weight"
             + (f", {len(kept)} kept float" if kept else "")
             + (f"; {len(split)} with in_features % blocksize ≠ 0 ({CPU_NOTE})" if split else ""),
    )
    if split:
        context.metrics["rows_split_blocks"] = split
    return graph


#: why the report lists linears whose rows are not whole blocks
CPU_NOTE = "plain bitsandbytes 0.50 on CPU mishandles such rows, see a3q.modeling.a3q_bnb_cpu; a3q computes them exactly"


def _rows_split_blocks(graph: ModelGraph, paths: list[str]) -> list[str]:
    return [path for path in paths if rows_split_blocks(graph.model.get_submodule(path))]
