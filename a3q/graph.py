"""ModelGraph: the model plus an explicit description of its structure.

Stages read and update this description instead of re-inspecting modules, so each stage can
ask "what is layer 7's v/o head dim?" without knowing how another stage built the modules.
The exported config and every report row are written from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from a3q.cache import get_settings, quantized_bytes_per_token, set_settings
from a3q.module_types import weight_bytes

#: the folder of an artifact that holds an unmerged PEFT adapter (:mod:`a3q.io.adapter`)
ADAPTER_DIR = "adapter"


@dataclass
class LayerStructure:
    """The sizes of one decoder layer, as A³ and later stages see them.

    ``head_dim`` is the original head dim (it fixes RoPE frequencies and the softmax scale);
    ``qk_head_dim``/``vo_head_dim`` are the current hidden sizes of the two attention circuits.
    ``rope_pairs`` holds, per KV head, the kept RoPE frequency-pair indices (None: all kept).
    ``quantized`` maps a linear's short name (``q``, ``k``, …, ``down``) to how it is stored.
    ``factor_ranks`` maps a linear's short name to the rank k of a two-factor replacement
    (``W ≈ B A``, ``k·(in + out)`` weights instead of ``in·out``), as low-rank baselines store it.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_head_dim: int
    vo_head_dim: int
    intermediate_size: int
    gated_mlp: bool = True
    rope_pairs: list[list[int]] | None = None
    quantized: dict[str, dict[str, Any]] = field(default_factory=dict)
    factor_ranks: dict[str, int] = field(default_factory=dict)

    def linear_shapes(self, hidden_size: int) -> dict[str, tuple[int, int]]:
        """``(in_features, out_features)`` of each linear, by short name, at the current sizes."""
        attn_q, attn_kv = self.num_heads * self.qk_head_dim, self.num_kv_heads * self.qk_head_dim
        shapes = {
            "q": (hidden_size, attn_q),
            "k": (hidden_size, attn_kv),
            "v": (hidden_size, self.num_kv_heads * self.vo_head_dim),
            "o": (self.num_heads * self.vo_head_dim, hidden_size),
            "up": (hidden_size, self.intermediate_size),
            "down": (self.intermediate_size, hidden_size),
        }
        if self.gated_mlp:
            shapes["gate"] = (hidden_size, self.intermediate_size)
        return shapes

    def linear_params(self, hidden_size: int) -> int:
        """Weights of this layer's linears (biases excluded): the unit of compression ratios.

        A factored linear of rank k counts ``k·(in + out)``: both factors are stored and run.
        """
        total = 0
        for name, (fan_in, fan_out) in self.linear_shapes(hidden_size).items():
            rank = self.factor_ranks.get(name)
            total += fan_in * fan_out if rank is None else rank * (fan_in + fan_out)
        return total

    def linear_bytes(self, hidden_size: int) -> int:
        """Bytes of this layer's linear weights as stored: bf16 for float linears, exact for quantized ones."""
        total = 0
        for name, (fan_in, fan_out) in self.linear_shapes(hidden_size).items():
            rank = self.factor_ranks.get(name)
            if rank is not None:
                total += 2 * rank * (fan_in + fan_out)
            else:
                total += weight_bytes(self.quantized.get(name), fan_in, fan_out)
        return total

    def kv_values_per_token(self) -> int:
        """Cached values per token: one key of qk_head_dim and one value of vo_head_dim per KV head."""
        return self.num_kv_heads * (self.qk_head_dim + self.vo_head_dim)


class LayerStore:
    """Where the decoder layers of a graph's model are, and the whole-model operations that depend on it.

    This base class is the in-memory store, every graph's default: each layer is in the model, so holding one costs
    nothing and nothing is read or written. :class:`a3q.layer_store.offloaded.OffloadedLayers` keeps layers in files
    (or host memory) and materializes one at a time. Code outside :mod:`a3q.layer_store` never asks which store a
    graph has: it holds layers (:func:`a3q.layer_store.hold.hold_layer`), marks the ones it changed, and leaves the
    whole-model questions below to the store. (It lives here, beside the graph, because every graph has one: the
    stores that need more than the model sit above the graph.)
    """

    #: the ``offload`` setting that loads a model into this kind of store again (a ``reload`` after ``export``)
    mode: str = "none"
    #: whether perplexity is scored layer by layer over all windows, each layer read once
    #: (:mod:`a3q.metrics.layerwise`), rather than window by window through the whole model
    layer_by_layer: bool = False

    def __init__(self) -> None:
        self._changed: set[int] = set()

    @contextmanager
    def materialized(self, graph: ModelGraph, index: int) -> Iterator[None]:
        """Layer ``index`` in memory for the duration (holds nest)."""
        yield

    def mark_changed(self, graph: ModelGraph, index: int, saved: Path | None = None) -> None:
        """A stage changed layer ``index`` (held, or just restored). ``saved``: a layer file
        (:mod:`a3q.layer_store.layer_file`) that already holds the layer as it is now."""
        self._changed.add(index)

    def changed_layers(self) -> list[int]:
        return sorted(self._changed)

    def stored_layer(self, graph: ModelGraph, index: int) -> Path | tuple[dict, dict] | None:
        """Layer ``index`` as the store keeps it outside the model: the path of a layer file, ``(modules, tensors)``
        in host memory, or None when only the model holds it."""
        return None

    def write_weights(self, graph: ModelGraph, folder: Path, max_shard_size: int) -> None:
        """The model's config and weights written into ``folder`` (an export's staging folder)."""
        graph.model.save_pretrained(folder, max_shard_size=max_shard_size)

    def summary(self) -> dict[str, Any]:
        """For reports: the store's mode and what it read and wrote."""
        return {"mode": self.mode, "changed_layers": len(self._changed)}


@dataclass
class ModelGraph:
    """A model in flight through a recipe.

    ``family`` names the architecture adapter (``llama`` for Llama/Mistral/Qwen2-style RoPE
    models, ``gpt2`` for learned-position MHA models). ``history`` records the stages applied so far.

    ``kv_cache`` is the quantized-cache setting (``bits``, ``group_size``, ``residual``, ``key_axis``;
    see :mod:`a3q.cache.quantized`) or None for a full-precision cache. The graph is the one source of truth for it:
    :meth:`set_kv_cache` also records it on the model's generation config (that is how ``generate()`` and an exported
    ``generation_config.json`` see it), and :func:`a3q.arch.surgery.redescribe` carries it to a rebuilt graph.
    Building a graph has no side effects on the model.
    """

    model: Any
    tokenizer: Any
    family: str
    hidden_size: int
    layers: list[LayerStructure]
    uses_rope: bool
    source: str
    history: list[dict[str, Any]] = field(default_factory=list)
    kv_cache: dict[str, Any] | None = None
    #: an unmerged LoRA adapter: the PeftModel whose causal LM is ``model`` (see :mod:`a3q.stages.lora`)
    adapter: Any = None
    #: where the decoder layers are: in the model (the default) or offloaded (:mod:`a3q.layer_store`)
    layer_store: LayerStore = field(default_factory=LayerStore)

    @property
    def kv_cache_bits(self) -> int | None:
        """Storage width of a cached value when the cache is quantized; None: the model's dtype."""
        return None if self.kv_cache is None else int(self.kv_cache["bits"])

    def set_kv_cache(self, settings: dict[str, Any] | None) -> None:
        """Quantize the cache as ``settings`` say (None: full precision), on the graph and on the model."""
        set_settings(self.model, settings)
        self.kv_cache = get_settings(self.model)

    def decoder_linear_params(self) -> int:
        """Parameters of the decoder's linear weights; embeddings, norms, biases and lm_head excluded."""
        return sum(layer.linear_params(self.hidden_size) for layer in self.layers)

    def decoder_linear_bytes(self) -> int:
        """Bytes of the decoder's linear weights as stored (float counted at bf16); see ``LayerStructure.linear_bytes``."""
        return sum(layer.linear_bytes(self.hidden_size) for layer in self.layers)

    def kv_bytes_per_token(self) -> float:
        """Bytes of KV cache one token occupies across all layers (keys + values); see :meth:`kv_bytes_per_layer`."""
        return sum(self.kv_bytes_per_layer())

    def kv_bytes_per_layer(self) -> list[float]:
        """Exact KV bytes per token of each layer, batch 1.

        Full precision: ``h_kv·(r_qk + r_vo)·bits/8``. Quantized cache: codes packed to ``ceil(r·bits/8)`` bytes per
        head and token, plus a float16 scale and zero (4 bytes) per group, i.e.
        ``h_kv·(ceil(r_qk·b/8) + ceil(r_vo·b/8) + 4·ceil(r_vo/G) + K)`` with ``K = 4·ceil(r_qk/G)`` for per-token
        keys or ``4·r_qk/G`` for per-channel keys (one scale/zero per channel per block of G tokens). The
        full-precision residual window of recent tokens is a constant per layer and is not included.
        """
        if self.kv_cache is not None:
            return [
                quantized_bytes_per_token(layer.num_kv_heads, layer.qk_head_dim, layer.vo_head_dim, self.kv_cache)
                for layer in self.layers
            ]
        bits = self.kv_cache_bits or torch.finfo(self.dtype).bits
        return [layer.kv_values_per_token() * bits / 8 for layer in self.layers]

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
            "kv_cache": self.kv_cache,
            "layers": [asdict(layer) for layer in self.layers],
            "history": self.history,
            **({"adapter": adapter_record(self.adapter)} if self.adapter is not None else {}),
        }


def adapter_record(adapter: Any) -> dict[str, Any] | None:
    """The manifest's description of an unmerged adapter (None when there is none)."""
    if adapter is None:
        return None
    config = adapter.peft_config[adapter.active_adapter]
    targets = config.target_modules
    return {
        "format": "peft",
        "path": ADAPTER_DIR,
        "peft_type": str(getattr(config.peft_type, "value", config.peft_type)),
        "r": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "params": sum(p.numel() for n, p in adapter.named_parameters() if "lora_" in n),
    }
