"""Make a3q's GPTQ linear a module PEFT can wrap with LoRA.

PEFT dispatches LoRA layers by module type; types it does not know can be registered on the ``LoraConfig``
(``LoraConfig._register_custom_module({module type: LoRA layer class})``, peft's "custom models" API). a3q's
``GPTQLinear`` computes ``F.linear(x, dequantize(), bias)`` and exposes ``in_features``/``out_features``, so PEFT's
own LoRA layer for quantized linears, :class:`peft.tuners.lora.gptq.GPTQLoraLinear` (``base(x) + B(A(dropout(x)))·s``,
no merging), fits it: gradients reach ``lora_A``/``lora_B`` (and the input) through the dequantised weight, while
the codes stay frozen buffers. :class:`GPTQLinearLora` only adds reading the sizes without PEFT's "unsupported layer
type" warning and a clear refusal to merge. (A process without a3q can register PEFT's class itself:
``config._register_custom_module({type(q_proj): GPTQLoraLinear})`` before ``PeftModel.from_pretrained(..., config=config)``.)

The module type is found on the model itself rather than imported, so the same registration also covers a
``GPTQLinear`` class that ``trust_remote_code`` loaded from an artifact's copy of the file (a different class object).
"""

from __future__ import annotations

from typing import Any

from peft.tuners.lora.gptq import GPTQLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


class GPTQLinearLora(GPTQLoraLinear):
    """PEFT's LoRA layer for quantized linears, around a3q's ``GPTQLinear`` (sizes read directly; merging refused)."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError("a LoRA adapter cannot be merged into GPTQ-quantized weights; keep it separate (merge: false)")


def is_gptq_linear(module: nn.Module) -> bool:
    """A linear stored as GPTQ codes and dequantised on the fly (a3q's ``GPTQLinear`` or its remote-code copy)."""
    return (
        not isinstance(module, nn.Linear)
        and hasattr(module, "qweight")
        and callable(getattr(module, "dequantize", None))
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
    )


def register_custom_modules(peft_config: Any, model: nn.Module) -> list[type]:
    """Register every GPTQ linear type found in ``model`` with ``peft_config``; returns the types registered."""
    types = sorted({type(module) for module in model.modules() if is_gptq_linear(module)}, key=lambda t: t.__qualname__)
    if types:
        peft_config._register_custom_module({module_type: GPTQLinearLora for module_type in types})
    return types


def quantized_targets(model: nn.Module) -> list[str]:
    """Names of LoRA-wrapped linears whose base weight is not a plain float ``nn.Linear`` (they cannot be merged)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            if type(base) is not nn.Linear:
                names.append(f"{name} ({type(base).__name__})")
    return names
