"""The output Fisher of every linear: how much KL a unit of error in each output channel costs, from one backward.

For a small change ``δ`` of the model's outputs, the KL of the next-token distributions from the unchanged model's is
``½ δᵀ F δ`` to second order, with ``F`` the Fisher information of the model's own predictions. Kept diagonal per
output channel of a linear (BRECQ's block-output Fisher, per channel), and with the token-wise gradient and error
taken as uncorrelated, a weight error ``ΔW`` of that linear costs

    KL ≈ ½ Σ_j F_j · ΔW_j E[x xᵀ] ΔW_jᵀ,    F_j = mean over tokens of (∂ Σ_t log p(y_t) / ∂ y_j)²,

with labels ``y_t`` sampled from the model's own distribution (so ``F`` is the Fisher, not the empirical Fisher of
the text's labels) and ``E[x xᵀ] = H / 2`` the GPTQ Hessian's half. Why not one KL probe per linear: a probe runs
the rest of the model and the LM head (seconds each on SmolLM2, on a CPU), and a space needs one per layer and input
group (120 on SmolLM2); this is one forward and one backward over a few windows. The search scales the sum of these
estimates by one probe of the reference quantization everywhere (:mod:`a3q.search.probes`), so their units are the
probes' and the diagonal's bias cancels to first order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from a3q.arch import layer_linears
from a3q.graph import ModelGraph


def output_fisher(graph: ModelGraph, windows: Tensor, groups: list[dict[str, tuple[str, ...]]], seed: int = 0,
                  batch_size: int = 2) -> list[dict[str, Tensor]]:
    """Per layer, per input group: ``F_j`` of each output channel of the group's linears, stacked in the group's
    order (``[Σ out_features]``, float64). Labels are drawn with a generator seeded by ``seed``."""
    sums: list[dict[str, Tensor]] = [{} for _ in groups]
    handles = []

    def record(index: int, key: str, position: int):
        def on_output(module, args, output):
            def on_gradient(gradient: Tensor) -> None:
                squares = gradient.detach().double().square().reshape(-1, gradient.shape[-1]).sum(0)
                parts = sums[index].setdefault(key, {})
                parts[position] = parts[position] + squares if position in parts else squares
            output.register_hook(on_gradient)
        return on_output

    for index, layer_groups in enumerate(groups):
        linears = layer_linears(graph.model, graph.family, index)
        for key, members in layer_groups.items():
            for position, short in enumerate(members):
                handles.append(linears[short].register_forward_hook(record(index, key, position)))
    embeddings = graph.model.get_input_embeddings()
    handles.append(embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_()))
    generator = torch.Generator().manual_seed(seed)
    tokens = 0
    was_training = graph.model.training
    graph.model.eval()
    frozen = [(parameter, parameter.requires_grad) for parameter in graph.model.parameters()]
    for parameter, _ in frozen:  # gradients of the outputs only: no parameter gradient is computed or kept
        parameter.requires_grad_(False)
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(embeddings.weight.device)
            logits = graph.model(input_ids=batch, use_cache=False).logits.float()
            with torch.no_grad():
                probabilities = torch.softmax(logits.detach().double(), -1).reshape(-1, logits.shape[-1])
                labels = torch.multinomial(probabilities.cpu(), 1, generator=generator).to(logits.device)
            log_probs = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), -1)
            log_probs.gather(1, labels).sum().backward()
            tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
        graph.model.train(was_training)
        for parameter, flag in frozen:
            parameter.requires_grad_(flag)
    return [{key: torch.cat([parts[p] for p in sorted(parts)]) / max(tokens, 1) for key, parts in layer.items()}
            for layer in sums]


def fisher_kl(fisher: Tensor, weight: Tensor, changed: Tensor, hessian: Tensor) -> float:
    """``½ Σ_j F_j ΔW_j (H/2) ΔW_jᵀ`` for ``ΔW = weight − changed`` (see the module docstring), in float64."""
    delta = (weight.double() - changed.double())
    per_channel = ((delta @ hessian.to(delta.device).double()) * delta).sum(1) / 2
    return float(0.5 * (fisher.to(delta.device) * per_channel).sum())
