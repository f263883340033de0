"""The module types stages swap into models: one entry each, read by loading, the layer store, the graph and serving.

Like PEFT's dispatchers, each :class:`ModuleType` says everything a3q needs about one kind of module, so that no
other code names the kinds:

* ``class_names``: which modules are of the type (by class name, so that the copies ``trust_remote_code`` loads from
  an artifact's files count too);
* ``config_key``: where the model config records the modules (their paths and settings); the load-time replacement
  (config → empty modules before the weights load) is the self-contained modeling file's
  (:data:`a3q.modeling.a3q_module_types.SWAP_INS`), which every family's constructor and a3q's loader call;
* ``module_class`` and ``arguments``: how a layer file (checkpoint, offload store) rebuilds a module of the type from
  its constructor arguments, never from pickle;
* ``describe`` and ``stored_bytes``: how a linear of the type is stored (the graph's ``quantized`` records) and the
  exact bytes that takes;
* ``serving``: what vLLM needs to serve a model holding the type (:class:`Serving`);
* ``adopt_loaded``: what a model that transformers just loaded needs before its first forward (bitsandbytes' CPU path).

A new module type is one self-contained module file in ``a3q/modeling/`` (the class and its ``replace_with_…``),
its line in ``SWAP_INS``, and its entry here (see docs/architecture.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from a3q.modeling.a3q_factored_linear import LowRankLinear
from a3q.modeling.a3q_gptq_linear import GPTQLinear
from a3q.modeling.a3q_module_types import SWAP_INS
from a3q.quant import bnb, gptq_linear


@dataclass(frozen=True)
class Serving:
    """What vLLM needs to serve a model holding the module type.

    ``vllm_quantization``: the name of vLLM's quantization method that runs the type (``gptq``, ``bitsandbytes``),
    None when vLLM has none. ``refusal``: why a3q's vLLM plugin refuses such a model (one line), None when it serves it.
    """

    vllm_quantization: str | None
    refusal: str | None


@dataclass(frozen=True)
class ModuleType:
    """One kind of module that stages swap into models (see the module docstring)."""

    name: str
    class_names: tuple[str, ...]
    config_key: str
    serving: Serving
    module_class: type[nn.Module] | None = None
    arguments: Callable[[nn.Module], dict[str, Any]] | None = None
    describe: Callable[[nn.Module], dict | None] | None = None
    stored_bytes: Callable[[dict, int, int], int] | None = None
    adopt_loaded: Callable[[nn.Module], None] | None = None
    #: whether a config dict records modules of this type (default: its ``config_key`` is set)
    recorded: Callable[[dict], bool] | None = None

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.class_names

    @property
    def swap_in(self) -> Callable[[nn.Module, Any], None] | None:
        """The load-time replacement (model, recorded value) → empty modules; None: transformers builds them."""
        return SWAP_INS.get(self.config_key)

    def is_recorded_in(self, config: dict) -> bool:
        return self.recorded(config) if self.recorded is not None else bool(config.get(self.config_key))

    def constructor_parameters(self) -> set[str]:
        """The arguments a layer file may give :attr:`module_class` (dtype and device are the store's)."""
        if self.module_class is None:
            return set()
        return set(inspect.signature(self.module_class).parameters) - {"dtype", "device"}


def _gptq_arguments(module: nn.Module) -> dict[str, Any]:
    return {"in_features": module.in_features, "out_features": module.out_features, "bits": module.bits,
            "group_size": module.group_size, "bias": module.bias is not None}


def _low_rank_arguments(module: nn.Module) -> dict[str, Any]:
    return {"in_features": module.in_features, "out_features": module.out_features, "rank": module.rank,
            "bias": module.second.bias is not None}


def _bitsandbytes_recorded(config: dict) -> bool:
    quantization = config.get("quantization_config")
    return isinstance(quantization, dict) and quantization.get("quant_method") == "bitsandbytes"


GPTQ = ModuleType(
    name="gptq", class_names=("GPTQLinear",), config_key="a3q_gptq",
    module_class=GPTQLinear, arguments=_gptq_arguments,
    describe=gptq_linear.describe, stored_bytes=gptq_linear.stored_bytes,
    serving=Serving("gptq", "vLLM's only CPU GPTQ kernel (CPUWNA16: 4-bit, every linear's inputs and outputs a "
                            "multiple of 32) cannot take A³'s sizes as exported, and the plugin neither repacks GPTQ "
                            "codes to padded sizes nor dequantizes silently"),
)
LOW_RANK = ModuleType(
    name="low_rank", class_names=("LowRankLinear",), config_key="a3q_factorized",
    module_class=LowRankLinear, arguments=_low_rank_arguments,
    serving=Serving(None, "vLLM has no two-factor linear layer; serve an A³ artifact"),
)
BITSANDBYTES = ModuleType(
    name="bnb", class_names=("Linear4bit", "Linear8bitLt"), config_key="quantization_config",
    describe=bnb.describe, stored_bytes=bnb.stored_bytes, adopt_loaded=bnb.adopt_loaded_model,
    recorded=_bitsandbytes_recorded,
    serving=Serving("bitsandbytes", "quantized A³ weights are not served by a3q's vLLM plugin; serve the float A³ "
                                    "artifact"),
)

#: every module type, by name (the ``method`` of its storage records)
MODULE_TYPES: dict[str, ModuleType] = {entry.name: entry for entry in (GPTQ, LOW_RANK, BITSANDBYTES)}


#: the class names a layer file may hold (types with constructor arguments)
REBUILDABLE = tuple(sorted(name for entry in MODULE_TYPES.values() if entry.module_class is not None
                           for name in entry.class_names))


def module_type_of(module: nn.Module) -> ModuleType | None:
    return next((entry for entry in MODULE_TYPES.values() if entry.matches(module)), None)


def rebuildable(class_name: str) -> ModuleType | None:
    """The type a layer file's module of class ``class_name`` is rebuilt as (None: not one a layer file may hold)."""
    entry = next((entry for entry in MODULE_TYPES.values() if class_name in entry.class_names), None)
    return entry if entry is not None and entry.module_class is not None else None


def swapped_modules(layer: nn.Module) -> dict[str, dict[str, Any]]:
    """The modules of ``layer`` that stages swapped in (rebuildable types), with their constructor arguments:
    ``{path: {"class": name, "args": {...}}}``. Every other module is what the layer's constructor builds from the
    config; a module of a type without ``arguments`` makes a strict state-dict load fail, naming its tensors."""
    swapped: dict[str, dict[str, Any]] = {}
    for path, module in layer.named_modules():
        entry = module_type_of(module)
        if entry is not None and entry.arguments is not None and not any(
                path.startswith(parent + ".") for parent in swapped):
            swapped[path] = {"class": type(module).__name__, "args": entry.arguments(module)}
    return swapped


def build_module(spec: dict[str, Any], dtype: Any, device: Any) -> nn.Module:
    """An empty module of a :func:`swapped_modules` record, on ``device`` (the tensors are assigned afterwards)."""
    entry = rebuildable(spec["class"])
    if entry is None:
        raise KeyError(f"'{spec['class']}' is not a module type a layer file may hold")
    return entry.module_class(**spec["args"], dtype=dtype, device=device)


def recorded_types(config: dict) -> list[ModuleType]:
    """The module types a config (as a dict) records."""
    return [entry for entry in MODULE_TYPES.values() if entry.is_recorded_in(config)]


def rebuilt_by_a3q(config: dict) -> bool:
    """Whether a config records modules that a3q's loader must swap in before the weights load (transformers
    would build dense linears in their place)."""
    return any(entry.swap_in is not None for entry in recorded_types(config))


def adopt_loaded_model(model: nn.Module) -> None:
    """What each module type needs in a model transformers just loaded, before its first forward."""
    for entry in MODULE_TYPES.values():
        if entry.adopt_loaded is not None:
            entry.adopt_loaded(model)


def storage_of(module: nn.Module) -> dict | None:
    """The storage record of a linear module (``{"method": ..., ...}``), or None for a plain float linear."""
    for entry in MODULE_TYPES.values():
        record = entry.describe(module) if entry.describe is not None else None
        if record is not None:
            return record
    return None


def weight_bytes(storage: dict | None, fan_in: int, fan_out: int) -> int:
    """Bytes of one linear's weight (bias excluded): bf16 when float, exact stored bytes when quantized."""
    if storage is None:
        return 2 * fan_in * fan_out
    entry = MODULE_TYPES.get(storage["method"])
    if entry is None or entry.stored_bytes is None:
        known = sorted(name for name, item in MODULE_TYPES.items() if item.stored_bytes is not None)
        raise KeyError(f"unknown weight storage '{storage['method']}' (known: {', '.join(known)})")
    return entry.stored_bytes(storage, fan_in, fan_out)
