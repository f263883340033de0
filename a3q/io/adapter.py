"""A LoRA adapter next to its base model: exported in PEFT's own format, loaded back through PEFT.

An artifact whose model carries an unmerged adapter holds the **base** model exactly as without LoRA (its LoRA
layers set aside while it is saved, so no ``lora_`` or ``base_layer`` keys), and the adapter in ``adapter/``
(``adapter_config.json`` + ``adapter_model.safetensors``, written by ``PeftModel.save_pretrained``). Either way of
loading gives the logits the model had before export:

```python
import a3q
graph = a3q.load("out/smollm2-a3-20-lora")        # base + adapter; graph.adapter is the PeftModel

from peft import PeftModel                          # without a3q
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained("out/smollm2-a3-20-lora", trust_remote_code=True)
model = PeftModel.from_pretrained(base, "out/smollm2-a3-20-lora/adapter")
```

(For a base quantized by a3q's ``gptq`` stage, PEFT needs to be told which LoRA layer wraps ``GPTQLinear``; see
:mod:`a3q.io.peft_modules`. ``a3q.load`` does that.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from a3q.graph import ADAPTER_DIR, ModelGraph


@contextmanager
def base_layers_only(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put every LoRA layer's base layer back in its place (non-destructive; restored on exit)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            if getattr(parent, child) is module:
                setattr(parent, child, module.get_base_layer())
                swapped.append((parent, child, module))
    try:
        yield model
    finally:
        for parent, child, module in reversed(swapped):
            setattr(parent, child, module)


def save_adapter(adapter: Any, directory: Path, base: str | Path | None = None) -> Path:
    """Write the adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``).

    ``base``: recorded as ``base_model_name_or_path`` (what ``AutoPeftModelForCausalLM`` would load); by default
    PEFT records where the model was first loaded from, which for a compressed model is the wrong (dense) model.
    """
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter.peft_config[adapter.active_adapter]
    recorded = config.base_model_name_or_path
    if base is not None:
        config.base_model_name_or_path = str(base)
    try:
        adapter.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
    finally:
        config.base_model_name_or_path = recorded
    return directory


@contextmanager
def adapter_set_aside(graph: ModelGraph, staging: Path, artifact: Path) -> Iterator[None]:
    """For ``artifact`` being written in ``staging``: inside, the model has no LoRA layers (save the base then);
    on a clean exit the adapter is written to ``staging/adapter``. A no-op for a graph without adapter."""
    if graph.adapter is None:
        yield
        return
    with base_layers_only(graph.model):
        yield
    save_adapter(graph.adapter, Path(staging) / ADAPTER_DIR, base=Path(artifact).resolve())


def attach_adapter(graph: ModelGraph, directory: Path | str, trainable: bool = False) -> ModelGraph:
    """``graph`` with the PEFT adapter saved in ``directory`` loaded onto its model (in place, as PEFT does)."""
    from peft import LoraConfig, PeftModel  # deferred: PEFT takes seconds to import; only an adapter needs it

    from a3q.io.peft_modules import register_custom_modules  # (imports PEFT)

    config = LoraConfig.from_pretrained(str(directory))
    register_custom_modules(config, graph.model)
    adapter = PeftModel.from_pretrained(graph.model, str(directory), config=config, is_trainable=trainable)
    adapter.eval()
    return with_adapter(graph, adapter)


def with_adapter(graph: ModelGraph, adapter: Any) -> ModelGraph:
    """A graph whose model is the adapter's causal LM (LoRA layers injected) and which keeps the PeftModel."""
    model = graph.model if adapter is None else adapter.get_base_model()
    return dataclasses.replace(graph, model=model, adapter=adapter)
