"""Registers the built-in storage formats with :mod:`a3q.quant` (imported lazily by it)."""

from a3q.quant import bnb, gptq_linear  # noqa: F401  (each module registers its format on import)
