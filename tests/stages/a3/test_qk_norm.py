"""A³-QK under per-head q/k norms, against brute force in float64 (a3q.stages.a3.qk_norm)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from a3q.stages.a3.qk import pair_coordinates, select_rope_pairs
from a3q.stages.a3.qk_norm import QK_NORM_MODES, coordinate_scores, norm_rescale, rescaled_norm_weight


def rms_norm(u: torch.Tensor, gain: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    return gain * u / torch.sqrt(u.square().mean(-1, keepdim=True) + eps)


def test_rescaled_norm_over_kept_coordinates_is_exact_when_the_kept_share_is_constant():
    """If ‖u_S‖²/‖u‖² is the same for every token, c·g_S ⊙ u_S / ρ_S(u_S) equals the dense g_S ⊙ u_S / ρ(u)."""
    gen = torch.Generator().manual_seed(0)
    d, heads, tokens = 16, 3, 500
    coords = pair_coordinates(torch.tensor([1, 4, 6]), d)
    rest = torch.tensor([c for c in range(d) if c not in coords.tolist()])
    u = torch.zeros(tokens, heads, d, dtype=torch.float64)
    kept = torch.randn(tokens, heads, len(coords), generator=gen, dtype=torch.float64)
    other = torch.randn(tokens, heads, len(rest), generator=gen, dtype=torch.float64)
    scale = torch.rand(tokens, heads, 1, generator=gen, dtype=torch.float64) * 5 + 0.1
    u[..., coords] = 0.6 * scale * kept / kept.norm(dim=-1, keepdim=True)
    u[..., rest] = 0.8 * scale * other / other.norm(dim=-1, keepdim=True)
    weight = torch.randn(d, generator=gen, dtype=torch.float64)
    for offset in (0.0, 1.0):  # Llama-style gain w, Gemma-style 1 + w
        c = norm_rescale(u.square().mean(0), coords)
        new_weight = rescaled_norm_weight(weight, coords, c, offset)
        compressed = rms_norm(u[..., coords], offset + new_weight)
        dense = rms_norm(u, offset + weight)[..., coords]
        torch.testing.assert_close(compressed, dense, rtol=1e-12, atol=1e-12)


def test_rescale_formula_and_full_rank_identity():
    gen = torch.Generator().manual_seed(1)
    moments = torch.rand(2, 8, generator=gen, dtype=torch.float64)
    coords = torch.tensor([0, 2, 4, 6])
    expected = math.sqrt(float(moments.sum(0)[coords].sum()) * 8 / (4 * float(moments.sum())))
    assert math.isclose(norm_rescale(moments, coords), expected, rel_tol=1e-14)
    everything = pair_coordinates(torch.arange(4), 8)
    assert norm_rescale(moments, everything) == 1.0
    weight = torch.randn(8, generator=gen)
    assert torch.equal(rescaled_norm_weight(weight, everything, 1.0, 1.0), weight)


def test_pair_selection_from_post_norm_moments_keeps_the_most_score_energy():
    """The chosen pairs maximise Σ_{c∈S} Σ_groups Σ_heads E[q̃_c²] E[k̃_c²] over every subset of pairs (brute force)."""
    gen = torch.Generator().manual_seed(2)
    d, h, h_kv, keep = 12, 4, 2, 3
    q_x2 = torch.rand(h, d, generator=gen, dtype=torch.float64) ** 3
    k_x2 = torch.rand(h_kv, d, generator=gen, dtype=torch.float64) ** 3
    per_coordinate = coordinate_scores(q_x2, k_x2, h_kv)
    brute = torch.zeros(d, dtype=torch.float64)
    for head in range(h):
        brute += q_x2[head] * k_x2[head // (h // h_kv)]
    torch.testing.assert_close(per_coordinate, brute)
    scores = per_coordinate[: d // 2] + per_coordinate[d // 2 :]
    chosen = select_rope_pairs(scores, 2 * keep)

    def energy(pairs) -> float:
        return float(brute[pair_coordinates(torch.tensor(pairs), d)].sum())

    best = max(itertools.combinations(range(d // 2), keep), key=energy)
    assert math.isclose(energy(chosen.tolist()), energy(list(best)), rel_tol=1e-12)


def _tiny_qk_norm_graph(family: str):
    from a3q.arch import describe
    from tests.arch.test_qwen3 import tiny_qwen3
    from tests.modeling.test_gemma3 import tiny_gemma

    model = tiny_qwen3() if family == "qwen3" else tiny_gemma()
    return model, describe(model, tokenizer=None, source="tiny")


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_a3_stage_on_qk_norm_families(family: str):
    """Through the stage: full rank reproduces the dense logits; at r_qk = head_dim/2 the norms have
    r_qk weights (rescaled, so they differ from the kept dense gains), ``keep`` leaves QK whole, logits stay finite."""
    import copy

    from a3q.engine import apply_stage

    dense, graph = _tiny_qk_norm_graph(family)
    windows = torch.randint(0, 97, (4, 20), generator=torch.Generator().manual_seed(5))
    probe = windows[:2, :14]
    with torch.no_grad():
        expected = dense(input_ids=probe).logits
    layer = graph.layers[0]
    full = dict(qk_rank=layer.head_dim, vo_rank=layer.head_dim, ff_rank=layer.intermediate_size)
    compressed, _ = apply_stage(copy.deepcopy(graph), "a3", windows=windows, **full)  # modes differ below full rank
    with torch.no_grad():
        actual = compressed.model(input_ids=probe).logits
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()
    for mode in QK_NORM_MODES:
        compressed, metrics = apply_stage(copy.deepcopy(graph), "a3", windows=windows, qk_norm=mode, qk_rank=8,
                                          vo_rank=8, ff_rank=24)
        attention = compressed.model.model.layers[0].self_attn
        assert attention.q_norm.weight.shape == ((16,) if mode == "keep" else (8,))
        assert compressed.layers[0].qk_head_dim == (16 if mode == "keep" else 8) and compressed.layers[0].vo_head_dim == 8
        with torch.no_grad():
            assert torch.isfinite(compressed.model(input_ids=probe).logits).all()


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_post_norm_moments_equal_direct_computation(family: str):
    """``q_norm_x2[h, c]`` is E[q̃_c²] of head h after the norm, whichever side of the head transpose the norm runs."""
    from a3q.arch.surgery import as_a3_graph
    from a3q.stages.a3.statistics import collect_statistics

    _, graph = _tiny_qk_norm_graph(family)
    graph = as_a3_graph(graph)
    windows = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(6))
    stats = collect_statistics(graph, windows, {"qk"}, progress=False)
    attention = graph.model.model.layers[1].self_attn
    with torch.no_grad():
        hidden = graph.model.model(input_ids=windows, output_hidden_states=True).hidden_states[1]
        u = attention.q_proj(graph.model.model.layers[1].input_layernorm(hidden)).reshape(3, 10, -1, 16)
        q = attention.q_norm(u).double()  # [batch, tokens, heads, d]: RMSNorm acts on the last axis only
    torch.testing.assert_close(stats[1].q_norm_x2, q.square().mean((0, 1)))


@pytest.mark.parametrize(("family", "mode", "exact"), [("qwen3", "pre_norm", True), ("gemma3", "pre_norm", False),
                                                      ("gemma3", "post_norm", True)])
def test_global_allocation_probe_equals_the_compressed_layer(family: str, mode: str, exact: bool):
    """Global allocation probes QK at the layer's full size (dropped coordinates zeroed, norm gains × sqrt(r/d)):
    its logits equal those of the model whose layer is really compressed (norm over the r kept coordinates): in
    float64 with the norms' ε = 0 to ~3e-7 of what the compression changes (HF's RMSNorms compute in float32 even
    for a float64 model), in float32 with ε = 1e-6 to ~2e-4. Zeroing the
    rows alone (the norm still over d coordinates) is far off, so the check has teeth."""
    import copy

    from a3q.arch import FAMILIES, LINEAR_PATHS
    from a3q.arch.surgery import as_a3_graph
    from a3q.stages.a3.sensitivity import _probe_weights
    from a3q.stages.a3.apply import compress_model, qk_norm_setting
    from a3q.stages.a3.ranks import LayerRanks
    from a3q.stages.a3.statistics import collect_statistics

    _, graph = _tiny_qk_norm_graph(family)
    graph = as_a3_graph(graph)
    if exact:  # float64, ε = 0: the emulation is then exact up to rounding
        graph.model.double()
        graph.model.config.rms_norm_eps = 0.0  # the compressed model is built from the config
        for module in graph.model.modules():
            for name in ("variance_epsilon", "eps"):
                if isinstance(getattr(module, name, None), float):
                    setattr(module, name, 0.0)
    windows = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(8))
    stats = collect_statistics(graph, windows, {"qk"}, progress=False)
    paths = dict(LINEAR_PATHS[graph.family])
    paths.update(zip(("q_norm", "k_norm"), FAMILIES[graph.family].qk_norm_paths))
    index, rank, setting = 1, 6, qk_norm_setting(graph, mode)
    layer_module = graph.model.model.layers[index]
    weights = {f"{short}.{kind}": getattr(layer_module.get_submodule(path), kind).detach()
               for short, path in paths.items() for kind in ("weight", "bias")
               if getattr(layer_module.get_submodule(path), kind, None) is not None}

    def logits_with(trial):
        model = copy.deepcopy(graph.model)
        with torch.no_grad():
            for key, tensor in trial.items():
                short, kind = key.split(".")
                getattr(model.model.layers[index].get_submodule(paths[short]), kind).copy_(tensor)
            return model(input_ids=windows).logits

    with torch.no_grad():
        dense = graph.model(input_ids=windows).logits
    full = _probe_weights(weights, graph.layers[index], stats[index], "qk", graph.layers[index].qk_head_dim, True,
                          1e-6, setting)
    assert torch.equal(logits_with(full), dense)  # full rank: the layer itself

    plans = [LayerRanks(qk=rank if i == index else layer.qk_head_dim, vo=layer.vo_head_dim, ff=layer.intermediate_size)
             for i, layer in enumerate(graph.layers)]
    compressed, _ = compress_model(graph, stats, plans, 1e-6, frozenset({"qk"}), progress=False, qk_norm=mode)
    with torch.no_grad():
        expected = compressed.model.to(dense.dtype)(input_ids=windows).logits
    trial = _probe_weights(weights, graph.layers[index], stats[index], "qk", rank, True, 1e-6, setting)
    error = float((logits_with(trial) - expected).norm() / (expected - dense).norm())
    rows_only = {key: tensor for key, tensor in trial.items() if "norm" not in key}
    naive = float((logits_with(rows_only) - expected).norm() / (expected - dense).norm())
    print(f"{family} {mode}: probe vs compressed {error:.1e} of the compression's change; rows zeroed only {naive:.2f}")
    assert error < (1e-5 if exact else 1e-3) and naive > 0.1, (error, naive)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_global_allocation_through_the_stage_on_qk_norm_families(family: str):
    """``allocation: global`` plans per-layer ranks at the uniform plan's budget (or smaller), probing QK with its
    norms; each layer's norms then have that layer's q/k head dim."""
    import copy

    from a3q.engine import apply_stage

    _, graph = _tiny_qk_norm_graph(family)
    windows = torch.randint(0, 97, (4, 20), generator=torch.Generator().manual_seed(5))
    uniform, _ = apply_stage(copy.deepcopy(graph), "a3", windows=windows, ratio=0.3, allocation="uniform")
    planned, metrics = apply_stage(copy.deepcopy(graph), "a3", windows=windows, ratio=0.3, allocation="global",
                                   probe_windows=2, probe_seq_len=14)
    assert set(metrics["sensitivity"]) == {"qk", "ov", "mlp"} and min(metrics["sensitivity"]["qk"]) > 0
    assert planned.decoder_linear_params() <= uniform.decoder_linear_params()
    for layer, structure in zip(planned.model.model.layers, planned.layers):
        assert layer.self_attn.q_norm.weight.shape == (structure.qk_head_dim,) == layer.self_attn.k_norm.weight.shape
    with torch.no_grad():
        assert torch.isfinite(planned.model(input_ids=windows).logits).all()
