"""The interface of an architecture adapter: everything a3q needs to know about one model family.

One :class:`Family` per file in ``a3q/arch/`` (``llama.py``, ``gpt2.py``, ``gemma3.py``, …), registered with
:func:`register_family`. Adding a family is writing one such file (plus, if its layers differ, its compressed
modeling code in ``a3q/modeling/``); nothing else changes: stages, the pipeline and export ask the adapter.

Module paths are those of a3q's compressed class (a dense model of the family is converted to it at full rank,
bit-identically, before stages touch its linears); families whose dense class uses the same names (Llama, Gemma)
need no weight mapping.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from a3q.graph import LayerStructure


@dataclass(frozen=True)
class Family:
    """What a family looks like; subclasses override the methods whose defaults do not fit."""

    name: str
    #: ``config.model_type`` values this adapter accepts (dense ones and a3q's compressed one)
    model_types: tuple[str, ...]
    #: model_type of a3q's compressed class for this family (its remote-code modeling file ships with artifacts)
    compressed_type: str
    #: short name (q, k, v, o, gate, up, down) → linear path relative to a decoder layer, in the compressed class
    linear_paths: dict[str, str]
    #: groups of linears that read the same input tensor (one Hessian / statistic serves the group)
    shared_inputs: tuple[tuple[str, ...], ...]
    #: dotted path of decoder layer ``{index}`` + "." (state-dict prefix)
    layer_prefix: str
    #: dotted paths of the decoder-layer ModuleList and of the norm before the LM head
    layers_path: str
    final_norm_path: str
    uses_rope: bool = True
    #: per-head norm modules on q and k (applied before RoPE), relative to a layer; None when the family has none
    qk_norm_paths: tuple[str, str] | None = None
    #: the norm's weight enters as ``(1 + w)`` (Gemma) rather than ``w`` (Llama, Qwen3)
    norm_weight_offset: float = 0.0
    #: axis of the heads in the q/k norm's output: 1 when the norm runs after the head transpose (Gemma,
    #: ``[batch, heads, tokens, d]``), 2 when before it (Qwen3, ``[batch, tokens, heads, d]``)
    qk_norm_head_axis: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    registry: ClassVar[dict[str, Family]] = {}

    # --- structure, from the config alone ------------------------------------------------------------------------
    def hidden_size(self, config: Any) -> int:
        return config.hidden_size

    def layer_structures(self, config: Any) -> list[LayerStructure]:
        """Per-layer sizes read from the config (a3q's per-layer lists when present, else the dense sizes)."""
        count = config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        qk = per_layer(config, "qk_head_dims", head_dim, count)
        vo = per_layer(config, "vo_head_dims", head_dim, count)
        ff = per_layer(config, "intermediate_sizes", config.intermediate_size, count)
        pairs = getattr(config, "rope_pairs", None) or [None] * count
        return [LayerStructure(num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                               head_dim=head_dim, qk_head_dim=qk[i], vo_head_dim=vo[i], intermediate_size=ff[i],
                               gated_mlp=True, rope_pairs=pairs[i] if self.uses_rope else None)
                for i in range(count)]

    # --- conversion to and from a3q's compressed class -----------------------------------------------------------
    def compressed_config(self, config: Any, **overrides: Any) -> Any:
        """The compressed class's config for a dense (or compressed) config; no overrides = full rank."""
        raise NotImplementedError

    def to_compressed_state_dict(self, state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
        """Dense state dict → the compressed class's key names and layouts (identity when the names agree)."""
        return dict(state)

    def compressed_classes(self) -> tuple[Any, Any, Any]:
        """``(config class, base model class, causal-LM class)`` of the compressed model."""
        raise NotImplementedError


def per_layer(config: Any, name: str, default: int, count: int) -> list[int]:
    """A per-layer list from the config, or ``default`` repeated."""
    values = getattr(config, name, None)
    return list(values) if values else [default] * count


#: the built-in adapters, imported by :func:`families` on first use (like the built-in stages): importing an adapter
#: never imports the others, and ``a3q.arch`` does not import its own submodules at import time (no import cycles).
#: Adding a family is writing one module and naming it here.
BUILTIN_FAMILY_MODULES = ("a3q.arch.llama", "a3q.arch.gpt2", "a3q.arch.gemma3", "a3q.arch.qwen3", "a3q.arch.phi3",
                          "a3q.arch.gemma2")


def families() -> dict[str, Family]:
    """Every registered adapter by name, in registration order (the built-in ones imported first)."""
    for module in BUILTIN_FAMILY_MODULES:
        importlib.import_module(module)
    return Family.registry


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: instantiate the adapter and register it under its name."""
    family = cls()
    Family.registry[family.name] = family
    return cls
