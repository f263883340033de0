"""The module types a3q swaps into models, by the config key that records them (torch only; ships in artifacts).

Why here: every family's causal-LM constructor must put the recorded modules in place before the weights load, in a
process that may not have a3q (``trust_remote_code=True``). So the config key → replacement table lives in this
self-contained file, copied next to exported weights with the modeling file that imports it, and
:func:`prepare_module_types` is the one call each constructor makes. a3q's own registry (:mod:`a3q.module_types`:
constructor arguments, storage size, serving) reads the same table.

A module type that the model's config records is listed in :data:`SWAP_INS`; bitsandbytes' linears are built by
transformers' own quantizer from ``quantization_config`` and only need the exact CPU path (:mod:`.a3q_bnb_cpu`).
"""

from __future__ import annotations

from torch import nn

from .a3q_bnb_cpu import bitsandbytes_cpu_hook
from .a3q_factored_linear import replace_with_factored_linears
from .a3q_gptq_linear import replace_with_gptq_linears

#: config key → ``swap_in(model, recorded value)``: empty modules of the type put where the record says, before the
#: weights load (idempotent: a module already of the type is left as it is)
SWAP_INS = {
    "a3q_factorized": replace_with_factored_linears,  # the low-rank baselines' two-factor linears (svd, asvd, svd_llm)
    "a3q_gptq": replace_with_gptq_linears,  # GPTQ-packed linears (a3q's gptq stage): the codes come with the weights
}


def recorded_value(config, key: str):
    """What ``config`` (a config object or its dict) records under ``key``, or None."""
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def swap_in_recorded_modules(model: nn.Module, config) -> None:
    """Put empty modules of every type ``config`` records into ``model`` (see :data:`SWAP_INS`)."""
    for key, swap_in in SWAP_INS.items():
        recorded = recorded_value(config, key)
        if recorded:
            swap_in(model, recorded)


def prepare_module_types(model: nn.Module) -> None:
    """What every a3q causal-LM constructor does last (after ``post_init``): the recorded module types swapped in,
    and bitsandbytes 4-bit linears switched to an exact CPU path before each call (a no-op without them)."""
    swap_in_recorded_modules(model, model.config)
    model.register_forward_pre_hook(bitsandbytes_cpu_hook)
