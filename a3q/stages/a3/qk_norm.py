"""A³-QK when q and k are RMS-normalised per head before RoPE (Gemma 2/3, Qwen3, OLMo 2).

The model computes, per head and token, ``q̃ = g ⊙ u / ρ(u)`` with ``u`` the q_proj output (one head, ``d``
coordinates), ``ρ(u) = sqrt(‖u‖²/d + ε)`` and the norm's gain ``g = o + w`` (``o = 1`` for Gemma's ``(1 + w)``
convention, ``0`` for Llama-style norms); likewise for k. RoPE then rotates pairs of coordinates of q̃ and k̃, and
the scores are ``q̃ᵀ R k̃``. Removing q/k coordinates changes ``ρ``: the norm is now over fewer numbers.

**Options** (the stage's ``qk_norm`` field):

(a) ``keep``: leave QK whole, compress OV and MLP only. Always exact on QK, but the budget must come from elsewhere.

(b) ``pre_norm`` (default): keep the RoPE pairs S (``|S| = r``) chosen from the *pre-norm* moments ``E[u_c²]`` as for Llama,
    compute the norm over the kept coordinates, ``ρ_S(u_S) = sqrt(‖u_S‖²/r + ε)``, and rescale the gain of the kept
    coordinates by one factor ``c``. Derivation: we want ``c g_S ⊙ u_S / ρ_S(u_S) ≈ g_S ⊙ u_S / ρ(u)``, i.e.
    ``c ≈ ρ_S/ρ``. Replacing both squared norms by their expectations (ε negligible),
    ``c² = (E‖u_S‖²/r) / (E‖u‖²/d)``, so ``c = sqrt(E‖u_S‖² · d / (r · E‖u‖²))``: the expected squared norm of the
    normalised kept vector is what it was in the dense model. It is exact whenever the kept share
    ``‖u_S‖²/‖u‖²`` is the same for every token (tested), and ``E‖u_S‖²`` comes from the diagonal of ``G_q``.

(c) ``post_norm``: the same norm and rescaling, but S is chosen from the moments *after* the norm and its
    gain, ``E[q̃_c²]`` and ``E[k̃_c²]``: the CUR pair score ``Σ_heads E[q̃_c²] · E[k̃_c²]`` is then the energy the
    dropped coordinates carry in the actual scores. The pre-norm moments ignore the gain, so (b) can keep
    coordinates the norm then nearly silences.

Measured on Gemma-3-270M (``benchmarks/quality.py --model gemma3-270m``: 16×512 calibration, 8×512 enwiki/test,
dense 31.69), perplexity at 10 / 20 / 30% of the decoder's linear weights removed (``keep`` removes QK's share from
OV and MLP, so every row has the same size):

=========  =====  =====  ======
mode        10%    20%    30%
=========  =====  =====  ======
keep       55.56  80.84  117.76
pre_norm   53.19  84.21  111.13
post_norm  51.14  91.24  145.90
=========  =====  =====  ======

No mode wins everywhere. ``post_norm`` is best at 10% but worst at 20 and 30% (why is not established: its
rescaling assumes the kept share of ``‖u‖²`` is the same for every token, and its pairs are chosen by a different
criterion than the share, but that was not measured); ``keep`` is best at 20% but keeps QK, and so the K cache,
whole; ``pre_norm`` is within 5% of the best at 10 and 20% and best at 30%, with the smaller cache: it is the
default. One model and 8 evaluation windows: re-measure on the next q/k-norm model.

The gain is one vector shared by every head of the layer, so with q/k norms all KV groups keep the same pairs
(scores summed over groups) and ``c`` is computed over all heads together.

**Global allocation's probes** (:func:`zero_padded_trial`) need the compressed QK at the layer's current size, so a
probe only swaps tensors. Zeroing the dropped rows of q_proj/k_proj alone is wrong here: the norm would still divide
by ``‖u_S‖²/d`` instead of ``‖u_S‖²/r``. Because the dropped coordinates are exactly zero, ``ρ(u) = ρ_S(u_S) ·
sqrt(r/d)`` (up to ε), so multiplying the kept gains by ``sqrt(r/d)`` as well makes the full-size layer compute what
the compressed one computes (tested to float rounding against the compressed layer).
"""

from __future__ import annotations

import torch
from torch import Tensor

QK_NORM_MODES = ("keep", "pre_norm", "post_norm")


def qk_pair_scores(stats, layer, mode: str) -> Tensor:
    """Score of each RoPE pair ``[d/2]`` (one set for every KV group), from the pre- or post-norm moments."""
    if mode == "post_norm":
        if stats.q_norm_x2 is None or stats.k_norm_x2 is None:
            raise ValueError("qk_norm: post_norm needs the normalised q/k moments (statistics from a q/k-norm family)")
        q_x2, k_x2 = stats.q_norm_x2, stats.k_norm_x2
    elif mode == "pre_norm":
        q_x2, k_x2 = stats.g_q.diagonal(dim1=-2, dim2=-1), stats.g_k.diagonal(dim1=-2, dim2=-1)
    else:
        raise ValueError(f"qk_norm {mode!r} does not compress QK")
    per_coordinate = coordinate_scores(q_x2, k_x2, layer.num_kv_heads)
    half = layer.qk_head_dim // 2
    return per_coordinate[:half] + per_coordinate[half:]


def zero_padded_trial(weights: dict[str, Tensor], stats, layer, coordinates: Tensor, offset: float
                      ) -> dict[str, Tensor]:
    """The layer's q/k weights (and biases) with every coordinate outside ``coordinates`` zeroed, and q/k norm
    weights that make the full-size norm compute the compressed one's (see the module docstring): what global
    allocation swaps in to probe QK at rank ``len(coordinates)``."""
    d = layer.qk_head_dim
    out: dict[str, Tensor] = {}
    for name, heads in (("q", layer.num_heads), ("k", layer.num_kv_heads)):
        weight = weights[f"{name}.weight"]
        mask = torch.zeros(d, dtype=weight.dtype, device=weight.device)
        mask[coordinates] = 1
        mask = mask.repeat(heads)
        out[f"{name}.weight"] = weight * mask[:, None]
        if f"{name}.bias" in weights:
            out[f"{name}.bias"] = weights[f"{name}.bias"] * mask
    emulate = (coordinates.numel() / d) ** 0.5  # ρ over d coordinates, r of them non-zero = ρ over r · sqrt(r/d)
    for name, moments in (("q_norm", stats.g_q), ("k_norm", stats.g_k)):
        weight = weights[f"{name}.weight"]
        scale = norm_rescale(moments.diagonal(dim1=-2, dim2=-1), coordinates)
        kept_gain = offset + rescaled_norm_weight(weight, coordinates, scale, offset).to(torch.float64)
        full = weight.clone()
        full[coordinates] = (emulate * kept_gain - offset).to(weight.dtype)
        out[f"{name}.weight"] = full
    return out


def norm_rescale(pre_norm_x2: Tensor, coordinates: Tensor) -> float:
    """``c = sqrt(E‖u_S‖² · d / (r · E‖u‖²))`` from per-coordinate pre-norm moments ``[heads, d]`` (summed over heads).

    ``coordinates`` are the kept head coordinates S (any order).
    """
    moments = pre_norm_x2.to(torch.float64).sum(dim=0)
    total, kept = float(moments.sum()), float(moments[coordinates].sum())
    if total <= 0.0 or kept <= 0.0:
        return 1.0  # nothing measured: keep the gain
    return (kept * moments.numel() / (coordinates.numel() * total)) ** 0.5


def rescaled_norm_weight(weight: Tensor, coordinates: Tensor, scale: float, offset: float) -> Tensor:
    """The stored weight ``w'`` of the compressed norm, whose gain is ``c · (o + w_S)``: ``w' = c (o + w_S) − o``."""
    if scale == 1.0:
        return weight[coordinates].clone()  # full rank: the weight itself, bit for bit
    kept = weight[coordinates].to(torch.float64)
    return (scale * (offset + kept) - offset).to(weight.dtype)


def coordinate_scores(q_x2: Tensor, k_x2: Tensor, groups: int) -> Tensor:
    """Per-coordinate CUR score ``Σ_heads E[q_c²] · E[k_c²]`` summed over KV groups: ``[h, d]``, ``[h_kv, d]`` → ``[d]``.

    Query head i belongs to KV group ``i // (h / h_kv)``.
    """
    q64, k64 = q_x2.to(torch.float64), k_x2.to(torch.float64)
    per_group = q64.reshape(groups, -1, q64.shape[-1]).sum(dim=1)  # [h_kv, d]
    return (per_group * k64).sum(dim=0)
