"""Quantizers and their storage formats: GPTQ (:mod:`a3q.quant.gptq`, the algorithm; :mod:`a3q.quant.gptq_linear`,
its storage) and bitsandbytes (:mod:`a3q.quant.bnb`). Which module is stored how, and in how many bytes, is
:mod:`a3q.module_types`'s one lookup over every module type."""
