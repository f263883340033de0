"""LoRA through PEFT: the ``lora`` stage (``stage``), its config (``config``), the training loop (``train``),
PEFT support for a3q's quantized linears (``custom``) and the adapter's export/load (``adapter``).

Importing :mod:`a3q.stages.lora.stage` registers the stage (``a3q.stages`` does it).
"""
