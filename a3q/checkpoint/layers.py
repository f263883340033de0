"""A finished decoder layer as checkpoint data: its tensors plus what rebuilding its modules needs, without pickle.

Stages change a layer in two ways only (:mod:`a3q.arch.surgery`): they rebuild it at new sizes, which the model
config's per-layer lists record (``qk_head_dims``, ``intermediate_sizes``, ``a3q_factorized``…), or they swap a linear
for a module of another class. A checkpoint therefore stores the model config (whole) and, per finished layer, the
swapped modules with their constructor arguments (:data:`REBUILDERS`) and the layer's state dict. Restoring builds
the layer from the config, swaps in empty modules of the recorded classes, and assigns the saved tensors (dtypes
included). A stage that swaps in a new module class registers it here, or restoring its layers fails naming their
unexpected tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from a3q.arch import decoder_layers


def _gptq_args(module: nn.Module) -> dict[str, Any]:
    return {"in_features": module.in_features, "out_features": module.out_features, "bits": module.bits,
            "group_size": module.group_size, "bias": module.bias is not None}


def _low_rank_args(module: nn.Module) -> dict[str, Any]:
    return {"in_features": module.in_features, "out_features": module.out_features, "rank": module.rank,
            "bias": module.second.bias is not None}


def _rebuilders() -> dict[str, tuple[type[nn.Module], Callable[[nn.Module], dict[str, Any]]]]:
    from a3q.modeling.a3q_factored_linear import LowRankLinear
    from a3q.modeling.a3q_gptq_linear import GPTQLinear

    return {"GPTQLinear": (GPTQLinear, _gptq_args), "LowRankLinear": (LowRankLinear, _low_rank_args)}


#: module classes that stages swap into layers: name → (class, constructor arguments of an instance)
REBUILDERS = _rebuilders()


def layer_modules(layer: nn.Module) -> dict[str, dict[str, Any]]:
    """The modules of ``layer`` that a stage swapped in (classes of :data:`REBUILDERS`), with constructor arguments.

    Any other module of the layer is what the layer's constructor builds from the config; a module of an
    unregistered class that a stage swapped in makes the strict state-dict load of :func:`restore_layer` fail
    naming its tensors.
    """
    swapped: dict[str, dict[str, Any]] = {}
    for path, module in layer.named_modules():
        name = type(module).__name__
        if name in REBUILDERS and not any(path.startswith(parent + ".") for parent in swapped):
            swapped[path] = {"class": name, "args": REBUILDERS[name][1](module)}
    return swapped


def build_layer(model: nn.Module, family: str, index: int) -> nn.Module:
    """Layer ``index`` as ``model.config`` describes it now, on the meta device (no memory, no random init).

    Models of transformers' own classes have no per-layer sizes: their layer's structure is the loaded one, so the
    existing module is returned.
    """
    from a3q.modeling.auto import is_a3_model

    old = decoder_layers(model, family)[index]
    if not is_a3_model(model):
        return old
    with torch.device("meta"):
        return type(old)(model.config, index)


def save_layer(model: nn.Module, family: str, index: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Layer ``index``'s swapped modules (JSON) and its tensors."""
    layer = decoder_layers(model, family)[index]
    swapped = layer_modules(layer)
    return swapped, {name: tensor.detach().contiguous() for name, tensor in layer.state_dict().items()}


def restore_layer(model: nn.Module, family: str, index: int, swapped: dict[str, dict[str, Any]],
                  tensors: dict[str, Tensor], device: torch.device | str | None = None) -> None:
    """Put back layer ``index`` from :func:`save_layer`'s output (the config must already be restored), on
    ``device`` (default: where the old layer's weights are). The saved tensors keep their dtypes."""
    from a3q.modeling.convert import _fill_meta_buffers

    layers = decoder_layers(model, family)
    old = layers[index]
    reference = next(old.parameters())
    device = reference.device if device is None else torch.device(device)
    new = build_layer(model, family, index)
    for path, spec in swapped.items():
        cls, _ = REBUILDERS[spec["class"]]
        new.set_submodule(path, cls(**spec["args"], dtype=reference.dtype, device="meta"))
    new.load_state_dict({name: tensor.to(device) for name, tensor in tensors.items()}, strict=True, assign=True)
    _fill_meta_buffers(new, device, old)  # RoPE index tables: derived from the config, in no file
    new.train(old.training)
    layers[index] = new
