"""``distill_layers``: the student's hidden states matched to the teacher's at chosen decoder layers (MSE).

A³ keeps ``d_model`` (it shrinks head dims and the MLP's width, never the residual stream), so a compressed
student's layer outputs live in the same space as its dense teacher's and can be compared coordinate by
coordinate. Each listed layer's output (the residual stream after it) is captured with a forward hook, on the
teacher when its targets are cached and on the student in every training forward.

The loss of one prediction position is ``distill_weight · mean over the listed layers of mean_d (h_s − h_t)²``,
summed over positions like the other losses (:class:`a3q.stages.lora.distill.Objective`). It is not normalised per
layer: hidden-state magnitudes grow with depth, so deep layers weigh more. Off by default (``distill_layers``
unset): measured on SmolLM2 A³ 20% (layers 9 and 19, weight 1) it made ``kd`` worse, the MSE outweighing the KL
(docs/results.md, "LoRA distillation").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from a3q.arch import decoder_layers


@contextmanager
def captured_layers(model: torch.nn.Module, family: str, layers: list[int] | None) -> Iterator[dict[int, torch.Tensor]]:
    """Inside: after each forward of ``model``, ``store[i]`` is decoder layer ``i``'s output ``[B, P, d]`` for every
    ``i`` in ``layers`` (nothing is captured when ``layers`` is empty or None)."""
    store: dict[int, torch.Tensor] = {}
    handles = []
    if layers:
        modules = decoder_layers(model, family)
        for index in layers:
            handles.append(modules[index].register_forward_hook(_keeper(store, index)))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _keeper(store: dict[int, torch.Tensor], index: int):
    def keep(_module, _inputs, output) -> None:
        store[index] = output[0] if isinstance(output, (tuple, list)) else output

    return keep


def stacked(store: dict[int, torch.Tensor], layers: list[int]) -> torch.Tensor:
    """The captured outputs of ``layers`` at the prediction positions, ``[B, L, P − 1, d]``."""
    return torch.stack([store[index][:, :-1] for index in layers], dim=1)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Σ over positions of the mean over layers and hidden dims of ``(student − teacher)²`` (both ``[B, L, P, d]``),
    in at least float32."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    difference = student.to(dtype) - teacher.to(dtype)
    return difference.square().mean(dim=(1, 3)).sum()
