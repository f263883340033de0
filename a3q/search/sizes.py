"""Exact sizes of a candidate from config.json alone, and of a built artifact from its safetensors headers.

The search must refuse an impossible budget before anything loads, and rank candidates inside the budget without
building them, so every size here is computed from the model's config: the A³ stage's rank rounding
(:func:`a3q.stages.a3.ranks.plan_ranks`), the KV stage's (:func:`a3q.stages.kv.plan_kv_layer_ranks`) and each
quantizer's stored bytes (:func:`a3q.module_types.weight_bytes`: GPTQ's packed codes, zeros, fp16 scales and
g_idx; bitsandbytes' codes, scales and quant state). Float linears count at the run's float width (float32 on a CPU
with ``dtype: auto``): that is what the artifact stores.

``allocation: uniform`` is exact. ``allocation: global`` moves ranks between layers at the same parameter budget,
so its float size matches the uniform plan's to a rank step and its quantized size to a group's rounding; the real
artifact is measured (:func:`artifact_linear_bytes`) and the budget is checked on that.

``bits_per_param`` (the issue's definition): stored bits of the decoder's linear layers (weights, low-rank factors,
scales and zeros; biases excluded) per parameter of the *input* model's decoder linears.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from a3q.arch import FAMILIES, LAYER_PREFIX, LINEAR_PATHS, layers_from_config
from a3q.cache.quantized import quantized_bytes_per_token
from a3q.graph import LayerStructure
from a3q.io.model_folder import read_header
from a3q.io.shards import weight_files
from a3q.module_types import weight_bytes
from a3q.search.candidate import Candidate
from a3q.stages.a3.ranks import plan_ranks
from a3q.stages.bnb import BnbConfig
from a3q.stages.gptq import GPTQConfig
from a3q.stages.kv import KVConfig, plan_kv_layer_ranks

#: bytes of one float weight in an artifact, by the recipe's dtype (``auto`` is float32 on a CPU)
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What sizing needs from a config.json: the family, hidden size and every decoder layer's sizes."""

    family: str
    hidden_size: int
    layers: list[LayerStructure]

    @property
    def uses_rope(self) -> bool:
        return FAMILIES[self.family].uses_rope

    def linear_params(self) -> int:
        """Parameters of the decoder's linear weights: the denominator of ``bits_per_param``."""
        return sum(layer.linear_params(self.hidden_size) for layer in self.layers)


@dataclass(frozen=True)
class SizeEstimate:
    """A candidate's decoder-linear bytes, bits per input parameter and KV-cache bytes per token."""

    linear_bytes: int
    bits_per_param: float
    kv_bytes_per_token: float


def model_shape(config: dict[str, Any]) -> ModelShape:
    """The shape of a config.json (a dict); a multimodal wrapper's ``text_config`` is read as the text model.
    Raises ``ValueError`` (with the reason) for a config a3q has no family for."""
    fields = {**config, **(config.get("text_config") or {})} if isinstance(config.get("text_config"), dict) else config
    try:
        family, hidden, layers = layers_from_config(SimpleNamespace(**{k: v for k, v in fields.items()
                                                                      if isinstance(k, str) and k.isidentifier()}))
    except (AttributeError, TypeError, KeyError) as exc:
        raise ValueError(f"config.json lacks a size field a3q needs ({exc})") from None
    return ModelShape(family, hidden, layers)


def candidate_layers(shape: ModelShape, candidate: Candidate) -> list[LayerStructure]:
    """The layers as the candidate's stages leave them: A³ ranks, then KV ranks and cache, then the quantizer."""
    layers = [copy.deepcopy(layer) for layer in shape.layers]
    if candidate.a3_ratio > 0:
        ratio = candidate.a3_ratio
        plans = plan_ranks(layers, {"qk": ratio, "ov": ratio, "mlp": ratio}, {}, 1, shape.uses_rope)
        layers = [_resized(layer, plan.qk, plan.vo, plan.ff) for layer, plan in zip(layers, plans)]
    kv = _kv_config(candidate)
    if kv is not None and kv.reduces_ranks():
        plans = plan_kv_layer_ranks(layers, kv, shape.uses_rope)
        layers = [_resized(layer, plan.qk, plan.vo, plan.ff) for layer, plan in zip(layers, plans)]
    record = quantized_record(candidate)
    if record is not None:
        skipped = (_stage_fields(candidate, ("gptq", "bnb")) or {}).get("skip_modules", [])
        for index, layer in enumerate(layers):  # skip_modules: path fragments kept in float, as the stages match them
            prefix = LAYER_PREFIX[shape.family].format(index=index)
            layer.quantized = {name: dict(record) for name in layer.linear_shapes(shape.hidden_size)
                               if not any(f in prefix + LINEAR_PATHS[shape.family][name] for f in skipped)}
    return layers


def estimate(shape: ModelShape, candidate: Candidate, float_bytes: int) -> SizeEstimate:
    """The candidate's sizes, exactly as the artifact will store them (see the module docstring for global)."""
    layers = candidate_layers(shape, candidate)
    total = 0
    for layer in layers:
        for name, (fan_in, fan_out) in layer.linear_shapes(shape.hidden_size).items():
            stored = layer.quantized.get(name)
            if stored is not None and stored.get("group_size") == -1:  # one group per row: GPTQLinear records fan_in
                stored = {**stored, "group_size": fan_in}
            total += fan_in * fan_out * float_bytes if stored is None else weight_bytes(stored, fan_in, fan_out)
    kv = _kv_config(candidate)
    cache = kv.cache_setting() if kv is not None else None
    if cache is None:
        kv_bytes = sum(layer.kv_values_per_token() * float_bytes for layer in layers)
    else:
        kv_bytes = sum(quantized_bytes_per_token(layer.num_kv_heads, layer.qk_head_dim, layer.vo_head_dim, cache)
                       for layer in layers)
    return SizeEstimate(total, 8 * total / shape.linear_params(), float(kv_bytes))


def quantized_record(candidate: Candidate) -> dict[str, Any] | None:
    """The storage record (as :mod:`a3q.module_types` reads it) every decoder linear of the candidate gets."""
    fields = _stage_fields(candidate, ("gptq", "bnb"))
    if fields is None:
        return None
    stage = fields.pop("stage")
    if stage == "gptq":
        config = GPTQConfig(**fields)
        return {"method": "gptq", "bits": config.bits, "group_size": config.group_size}
    if stage == "bnb":
        bnb = BnbConfig(**fields)
        if bnb.quant_type == "int8":
            return {"method": "bnb", "quant_type": "int8", "threshold": bnb.threshold}
        return {"method": "bnb", "quant_type": bnb.quant_type, "double_quant": bnb.double_quant,
                "blocksize": bnb.blocksize, "compute_dtype": bnb.compute_dtype}
    raise ValueError(f"no size rule for weight stage '{stage}'")


def _stage_fields(candidate: Candidate, names: tuple[str, ...]) -> dict[str, Any] | None:
    """The recipe fields of the candidate's stage named one of ``names`` (its recipe form: lists, not tuples)."""
    return next((stage for stage in candidate.stages() if stage["stage"] in names), None)


def _kv_config(candidate: Candidate) -> KVConfig | None:
    fields = _stage_fields(candidate, ("kv",))
    if fields is None:
        return None
    fields.pop("stage")
    return KVConfig(**fields)


def _resized(layer: LayerStructure, qk: int, vo: int, ff: int) -> LayerStructure:
    resized = copy.deepcopy(layer)
    resized.qk_head_dim, resized.vo_head_dim, resized.intermediate_size = qk, vo, ff
    return resized


def artifact_linear_bytes(path: str | Path, family: str) -> int:
    """Bytes the artifact's files hold for the decoder's linear layers (every tensor of a linear module: weights,
    packed codes, scales, zeros, g_idx, quant state; biases excluded), from the safetensors headers alone."""
    modules = set(LINEAR_PATHS[family].values())
    prefix = LAYER_PREFIX[family].split("{index}")[0]
    total = 0
    for file in weight_files(path):
        for name, entry in read_header(file).items():
            if name == "__metadata__" or not name.startswith(prefix):
                continue
            rest = name[len(prefix):].split(".", 1)[-1]  # past the layer index
            module = next((m for m in modules if rest.startswith(m + ".")), None)
            if module is not None and rest[len(module) + 1:] != "bias":
                start, end = entry["data_offsets"]
                total += end - start
    return total
