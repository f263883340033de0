"""Per-layer A³ shapes shared by every compressed model class: checking them, and where each layer's RoPE pairs are.

Self-contained (torch only): copied next to exported weights with the modeling files that import it.
"""

from dataclasses import dataclass

import torch

__all__ = ["CausalA3Shapes", "normalize_a3_shapes", "rope_gather_index"]


@dataclass(kw_only=True, repr=False, eq=False)
class CausalA3Shapes:
    """The per-layer A³ shapes a family's compressed config adds to its dense config, checked after the dense
    config's own ``__post_init__`` (every field defaults to the dense model), for families whose config can also
    describe bidirectional attention (Gemma 2 and 3): a3q's classes are causal only.

    A dataclass mixin because transformers' configs are dataclasses: ``class A3Gemma2Config(CausalA3Shapes,
    Gemma2Config)`` gets these fields like its own.
    """

    qk_head_dims: list[int] | None = None
    vo_head_dims: list[int] | None = None
    intermediate_sizes: list[int] | None = None
    rope_pairs: list | None = None  # per layer: None (all pairs) or one sorted list of kept pairs per KV head

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        normalize_a3_shapes(self)
        if getattr(self, "use_bidirectional_attention", False):
            raise ValueError(f"{type(self).__name__} supports causal attention only (use_bidirectional_attention=False).")


def normalize_a3_shapes(config) -> None:
    """Fill the per-layer A³ shape lists of ``config`` (dense sizes where absent) and check them.

    Shared by every family's compressed config (Llama, Gemma 3, …), so a bad shape fails at config time, naming the
    layer, and never deep inside a forward.
    """
    n_layers, d, h, h_kv = config.num_hidden_layers, config.head_dim, config.num_attention_heads, config.num_key_value_heads
    config.qk_head_dims = [int(r) for r in (config.qk_head_dims or [d] * n_layers)]
    config.vo_head_dims = [int(r) for r in (config.vo_head_dims or [d] * n_layers)]
    config.intermediate_sizes = [int(r) for r in (config.intermediate_sizes or [config.intermediate_size] * n_layers)]
    config.rope_pairs = [
        None if layer is None else [[int(p) for p in head] for head in layer]
        for layer in (config.rope_pairs or [None] * n_layers)
    ]
    if h % h_kv or d % 2:
        raise ValueError(f"need heads ({h}) divisible by KV heads ({h_kv}) and an even head_dim ({d}).")
    for name in ("qk_head_dims", "vo_head_dims", "intermediate_sizes", "rope_pairs"):
        if len(getattr(config, name)) != n_layers:
            raise ValueError(f"{name} needs one entry per layer ({n_layers}), got {getattr(config, name)}.")
    for l, (r_qk, r_vo, r_ff, pairs) in enumerate(
        zip(config.qk_head_dims, config.vo_head_dims, config.intermediate_sizes, config.rope_pairs)
    ):
        if r_qk < 2 or r_qk > d or r_qk % 2:
            raise ValueError(f"layer {l}: qk head dim {r_qk} must be even and in [2, head_dim={d}].")
        if r_vo < 1 or r_ff < 1:
            raise ValueError(f"layer {l}: vo head dim ({r_vo}) and intermediate size ({r_ff}) must be >= 1.")
        if pairs is None and r_qk != d:
            raise ValueError(f"layer {l}: qk head dim {r_qk} < head_dim {d} requires rope_pairs[{l}].")
        if pairs is not None and len(pairs) != h_kv:
            raise ValueError(f"layer {l}: rope_pairs needs one list per KV head ({h_kv}), got {len(pairs)}.")
        for j, head in enumerate(pairs or []):
            if len(head) != r_qk // 2 or any(not 0 <= p < d // 2 for p in head) or head != sorted(set(head)):
                raise ValueError(
                    f"layer {l}, KV head {j}: rope_pairs must be {r_qk // 2} sorted distinct pair indices in "
                    f"[0, {d // 2}), got {head}."
                )


def rope_gather_index(config, layer_idx: int) -> torch.Tensor:
    """Columns of the full-size cos/sin that each KV group of ``layer_idx`` uses: ``[h_kv, r_qk]`` (int64).

    Row j is ``cat(pairs_j, pairs_j + head_dim // 2)``, matching the within-head coordinate order of q/k rows.
    """
    d, h_kv = config.head_dim, config.num_key_value_heads
    pairs = config.rope_pairs[layer_idx]
    if pairs is None:
        p = torch.arange(d // 2, dtype=torch.long).expand(h_kv, d // 2)
    else:
        p = torch.tensor(pairs, dtype=torch.long).reshape(h_kv, -1)
    return torch.cat([p, p + d // 2], dim=-1).contiguous()
