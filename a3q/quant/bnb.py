"""bitsandbytes' 4-bit (NF4/FP4) and 8-bit (LLM.int8()) linears: quantizing, and their storage format (the ``bnb``
entry of :mod:`a3q.module_types`).

What is stored per quantized linear, in bitsandbytes' own state-dict serialisation (what ``save_pretrained`` writes
and ``from_pretrained`` with a ``BitsAndBytesConfig`` reads back), for ``n = in·out`` weights:

* 4-bit: ``weight`` uint8 ``[ceil(n/2), 1]`` (two codes per byte); ``weight.absmax``: one scale per block of
  ``blocksize`` weights, float32, or with double quantization uint8 codes plus ``weight.nested_absmax`` (float32, one
  per 256 scales) and ``weight.nested_quant_map`` (float32 [256]); ``weight.quant_map`` (float32 [16]); and
  ``weight.quant_state.bitsandbytes__<type>``, a uint8 tensor holding the JSON of the remaining fields (shape,
  dtype, blocksize, nested offset). Its length depends on how Python prints the nested offset, so the storage
  record carries it as ``metadata_bytes``.
* 8-bit: ``weight`` int8 ``[out, in]``, ``SCB`` float32 ``[out]`` (row scales) and ``weight_format`` (one uint8).

CPU caveats (bitsandbytes 0.50): on AVX512-BF16 CPUs ``Linear4bit`` repacks its weight on the first eval-mode call
for a bf16 kernel (bf16 activations whatever ``compute_dtype`` says; asserts on shapes such as 459 inputs), and the
native CPU dequantization is silently wrong when ``in_features % blocksize != 0``. a3q's 4-bit linears avoid both
(:func:`a3q.modeling.a3q_bnb_cpu.use_exact_cpu_path`), in the stage and in ``a3q.load``; storage is unchanged.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import torch
from torch import nn

from a3q.modeling.a3q_bnb_cpu import dequantize_4bit_exact, use_exact_cpu_path
from a3q.placement import DTYPES

QUANT_TYPES = ("nf4", "fp4", "int8")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: blocksize of the second-level (double) quantization of the 4-bit scales; fixed inside bitsandbytes
NESTED_BLOCKSIZE = 256

__all__ = [
    "QUANT_TYPES", "describe", "stored_bytes", "quantize_linear", "dequantize", "quantization_config",
    "mark_quantized", "use_exact_cpu_path", "adopt_loaded_model", "quiet_int8_cast_warning", "is_bnb_linear",
]


def _bnb():
    """bitsandbytes, imported on first use (the import prints a harmless "No module named 'kernels'")."""
    import bitsandbytes

    return bitsandbytes


def _loaded_bnb():
    """bitsandbytes if it is already imported, else None (no bitsandbytes module can exist before that)."""
    import sys

    return sys.modules.get("bitsandbytes")


def is_bnb_linear(module: Any) -> bool:
    bnb = _loaded_bnb()
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def describe(module: Any) -> dict | None:
    """The storage record of a bitsandbytes linear, or None for any other module."""
    bnb = _loaded_bnb()
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        weight = module.weight
        return {
            "method": "bnb",
            "quant_type": weight.quant_type,
            "double_quant": bool(weight.compress_statistics),
            "blocksize": int(weight.blocksize),
            "compute_dtype": _dtype_name(module.compute_dtype),
            "metadata_bytes": _metadata_bytes(weight.quant_state, module.out_features, module.in_features),
        }
    if isinstance(module, bnb.nn.Linear8bitLt):
        return {"method": "bnb", "quant_type": "int8", "threshold": float(module.state.threshold)}
    return None


def _metadata_bytes(state: Any, out_features: int, in_features: int) -> int | None:
    """Length of the JSON blob ``weight.quant_state.bitsandbytes__<type>`` that saving this weight writes."""
    if state is None:
        return None
    if getattr(state, "packing_format_for_cpu", False):  # bnb's CPU layout (see module docstring): best effort
        nested = state.original_nested
        fields = {"quant_type": state.quant_type, "blocksize": state.blocksize,
                  "dtype": _dtype_name(state.original_dtype), "shape": [out_features, in_features]}
        if nested:
            fields.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=float(state.offset))
        return len(json.dumps(fields).encode())
    packed = state.as_dict(packed=True)
    return int(packed[f"quant_state.bitsandbytes__{state.quant_type}"].numel())


def stored_bytes(storage: dict, fan_in: int, fan_out: int) -> int:
    """Exact bytes bitsandbytes' state dict holds for one weight (bias excluded); see the module docstring."""
    count = fan_in * fan_out
    if storage["quant_type"] == "int8":
        return count + 4 * fan_out + 1  # int8 codes + float32 SCB per row + the uint8 weight_format flag
    blocks = math.ceil(count / storage["blocksize"])
    codes = math.ceil(count / 2)
    if storage["double_quant"]:
        scales = blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 * 256
    else:
        scales = 4 * blocks
    metadata = storage.get("metadata_bytes")
    if metadata is None:  # a record written without it: the blob as it would be for float32 weights
        metadata = _estimated_metadata_bytes(storage, fan_in, fan_out)
    return codes + scales + 4 * 16 + metadata


def _estimated_metadata_bytes(storage: dict, fan_in: int, fan_out: int) -> int:
    fields = {"quant_type": storage["quant_type"], "blocksize": storage["blocksize"], "dtype": "float32",
              "shape": [fan_out, fan_in]}
    if storage["double_quant"]:
        fields.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=0.012345678901234567)
    return len(json.dumps(fields).encode())


@torch.no_grad()
def quantize_linear(
    linear: nn.Linear,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "float32",
    blocksize: int = 64,
    threshold: float = 6.0,
) -> nn.Module:
    """A bitsandbytes linear holding ``linear``'s weight quantized (and its bias unchanged), on its device.

    4-bit: ``Linear4bit`` with ``quant_type`` nf4/fp4, ``blocksize`` weights per scale, scales quantized again
    when ``double_quant``; it computes in ``compute_dtype``. int8: ``Linear8bitLt`` (LLM.int8(): per-row int8
    weights; in eval mode activations are quantized per token, columns with a value above ``threshold`` stay
    in float16; 0 disables that). The new module keeps ``linear``'s training flag.
    """
    bnb = _bnb()
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    device = linear.weight.device
    has_bias = linear.bias is not None
    weight = linear.weight.detach().contiguous()
    if quant_type == "int8":
        module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                     has_fp16_weights=False, threshold=threshold, device="meta")
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)  # new codes
        quiet_int8_cast_warning()
    else:
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
        module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                   compute_dtype=DTYPES[compute_dtype], compress_statistics=double_quant,
                                   quant_type=quant_type, quant_storage=torch.uint8, device="meta")
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=blocksize,
                                          compress_statistics=double_quant, quant_type=quant_type,
                                          quant_storage=torch.uint8, module=module).to(device)
        use_exact_cpu_path(module)  # see a3q.modeling.a3q_bnb_cpu
    if has_bias:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    module.train(linear.training)
    return module


@torch.no_grad()
def dequantize(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight ``[out, in]`` a bitsandbytes linear stands for (what its reference path multiplies by)."""
    bnb = _bnb()
    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):  # in torch: bitsandbytes' CPU kernel is wrong for some shapes
        return dequantize_4bit_exact(weight.data, weight.quant_state, dtype)
    if isinstance(module, bnb.nn.Linear8bitLt):
        codes = module.state.CB if module.state.CB is not None else weight.data
        scales = module.state.SCB if module.state.SCB is not None else weight.SCB
        return bnb.functional.int8_vectorwise_dequant(codes, scales).to(dtype)
    raise TypeError(f"not a bitsandbytes linear: {type(module).__name__}")


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: str, threshold: float,
                        skip_modules: list[str]) -> Any:
    """The Hugging Face ``BitsAndBytesConfig`` that makes ``from_pretrained`` rebuild exactly these modules.

    ``skip_modules`` must name every ``nn.Linear`` left in float (module paths; transformers matches each as a
    prefix at a module boundary, a regex, or a suffix), the LM head included: an explicit list replaces
    transformers' own default skips.
    """
    from transformers import BitsAndBytesConfig

    if quant_type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold, llm_int8_has_fp16_weight=False,
                                  llm_int8_skip_modules=list(skip_modules))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=DTYPES[compute_dtype],
                              bnb_4bit_quant_storage=torch.uint8, llm_int8_skip_modules=list(skip_modules))


def mark_quantized(model: Any, config: Any) -> None:
    """Give a model quantized in place what ``from_pretrained`` gives a bitsandbytes model it loads.

    ``config.quantization_config`` (so ``save_pretrained`` writes it and ``from_pretrained`` reads the weights back
    as bitsandbytes linears), the ``hf_quantizer`` and the flags transformers checks (``.to(dtype)`` refused,
    ``dequantize()`` available).
    """
    from transformers import PreTrainedModel
    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(config, pre_quantized=True)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.config.quantization_config = config
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config._is_quantized = True
    quantizer._process_model_after_weight_loading(model)  # is_loaded_in_4bit / is_loaded_in_8bit


def adopt_loaded_model(model: Any) -> None:
    """Make a bitsandbytes model that transformers just loaded behave like the one the ``bnb`` stage built.

    4-bit linears take an exact CPU path (:func:`~a3q.modeling.a3q_bnb_cpu.use_exact_cpu_path`); the per-call
    float16-cast warning of 8-bit linears is silenced (:func:`quiet_int8_cast_warning`). Call it before the first
    forward pass. A no-op for models without bitsandbytes linears.
    """
    if _loaded_bnb() is None:
        return
    use_exact_cpu_path(model)
    if any(is_bnb_linear(module) for module in model.modules()):
        quiet_int8_cast_warning()


class _DropInt8CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quiet_int8_cast_warning() -> None:
    """Drop bitsandbytes' "MatMul8bitLt: inputs will be cast from … to float16" warning, which it logs on every
    call of every 8-bit linear (the cast is how LLM.int8() works; nothing is wrong). Idempotent."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(existing, _DropInt8CastWarning) for existing in logger.filters):
        logger.addFilter(_DropInt8CastWarning())

