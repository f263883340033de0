"""ModelGraph: the model plus an explicit description of its structure.

Stages read and update this description instead of re-inspecting modules, so each stage can
ask "what is layer 7's v/o head dim?" without knowing how another stage built the modules.
The exported config and every report row are written from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class LayerStructure:
    """The sizes of one decoder layer, as A³ and later stages see them.

    ``head_dim`` is the original head dim (it fixes RoPE frequencies and the softmax scale);
    ``qk_head_dim``/``vo_head_dim`` are the current hidden sizes of the two attention circuits.
    ``rope_pairs`` holds, per KV head, the kept RoPE frequency-pair indices (None: all kept).
    ``quantized`` maps a linear's short name (``q``, ``k``, …, ``down``) to how it is stored.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_head_dim: int
    vo_head_dim: int
    intermediate_size: int
    gated_mlp: bool = True
    rope_pairs: list[list[int]] | None = None
    quantized: dict[str, str] = field(default_factory=dict)

    def linear_params(self, hidden_size: int) -> int:
        """Weights of this layer's linears (biases excluded): the unit of compression ratios."""
        qk = hidden_size * (self.num_heads + self.num_kv_heads) * self.qk_head_dim
        vo = hidden_size * (self.num_kv_heads + self.num_heads) * self.vo_head_dim
        mlp = (3 if self.gated_mlp else 2) * hidden_size * self.intermediate_size
        return qk + vo + mlp

    def kv_values_per_token(self) -> int:
        """Cached values per token: one key of qk_head_dim and one value of vo_head_dim per KV head."""
        return self.num_kv_heads * (self.qk_head_dim + self.vo_head_dim)


@dataclass
class ModelGraph:
    """A model in flight through a recipe.

    ``family`` names the architecture adapter (``llama`` for Llama/Mistral/Qwen2-style RoPE
    models, ``gpt2`` for learned-position MHA models). ``kv_cache_bits`` is the storage width of
    a cached value (the model dtype unless a KV stage quantizes the cache); KV bytes per token are
    computed from it and the per-layer sizes. ``history`` records the stages applied so far.
    """

    model: Any
    tokenizer: Any
    family: str
    hidden_size: int
    layers: list[LayerStructure]
    uses_rope: bool
    source: str
    history: list[dict[str, Any]] = field(default_factory=list)
    kv_cache_bits: int | None = None

    def decoder_linear_params(self) -> int:
        """Parameters of the decoder's linear weights; embeddings, norms, biases and lm_head excluded."""
        return sum(layer.linear_params(self.hidden_size) for layer in self.layers)

    def kv_bytes_per_token(self) -> float:
        """Bytes of KV cache one token occupies across all layers (keys + values)."""
        bits = self.kv_cache_bits or torch.finfo(self.dtype).bits
        return sum(layer.kv_values_per_token() for layer in self.layers) * bits / 8

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def structure(self) -> dict[str, Any]:
        """A JSON-serialisable description, written into reports and artifact manifests."""
        return {
            "family": self.family,
            "hidden_size": self.hidden_size,
            "uses_rope": self.uses_rope,
            "source": self.source,
            "kv_cache_bits": self.kv_cache_bits,
            "layers": [asdict(layer) for layer in self.layers],
            "history": self.history,
        }
