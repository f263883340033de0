"""LoRA through PEFT: the ``lora`` stage (``stage``), its config (``config``) and the training loop (``train``).

The adapter's export/load in PEFT's format is :mod:`a3q.io.adapter`; PEFT support for a3q's quantized linears is
:mod:`a3q.io.peft_modules` (both are used by loading, which must not depend on a stage).
"""
