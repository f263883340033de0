"""Non-finite values stop a run where they appear, with the tensor and layer named.

A NaN that slips into a weight survives every later stage (quantization scales, low-rank factors, the export) and
surfaces, if at all, as a misleading error far away (``cholesky: not positive-definite``) or as an artifact that
loads and produces garbage. So the engine checks the model before and after every stage, and the layer-by-layer
pass checks each layer as it is finished and the activations it hands on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


class NonFiniteError(RuntimeError):
    """A tensor holds NaN or inf values; the message names it."""


def _describe(name: str, tensor: Tensor) -> str:
    nans = int(torch.isnan(tensor).sum())
    infs = int(torch.isinf(tensor).sum())
    layer = _LAYER_INDEX.search(name)
    where = f" (layer {layer.group(1)})" if layer else ""
    return f"{name}{where}: {nans} NaN and {infs} inf of {tensor.numel():,} values"


def non_finite_tensors(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """Descriptions of the floating-point tensors among ``named`` that hold NaN or inf (each tensor once)."""
    seen: set[int] = set()
    found = []
    for name, tensor in named:
        if id(tensor) in seen or not torch.is_floating_point(tensor) or tensor.is_meta:
            continue
        seen.add(id(tensor))
        if not bool(torch.isfinite(tensor).all()):
            found.append(_describe(name, tensor.detach()))
    return found


def check_module_finite(module: nn.Module, where: str, prefix: str = "") -> None:
    """Raise :class:`NonFiniteError` if any parameter or buffer of ``module`` is not finite."""
    named = [*module.named_parameters(prefix=prefix.rstrip(".")), *module.named_buffers(prefix=prefix.rstrip("."))]
    found = non_finite_tensors(named)
    if found:
        more = f" (and {len(found) - 1} more tensors)" if len(found) > 1 else ""
        raise NonFiniteError(f"{where}: non-finite values in {found[0]}{more}")


def check_activations_finite(tensors: Iterable[Tensor], where: str) -> None:
    """Raise :class:`NonFiniteError` if any activation tensor holds NaN or inf."""
    for batch, tensor in enumerate(tensors):
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"{where}: non-finite activations ({_describe(f'batch {batch}', tensor)})")
