"""The a3 stage's model path on tiny random models: statistics, full-rank identity, NoPE SVD.

Random tiny models are fine here: these tests check shapes and maths, not quality.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from a3q.arch import describe, layer_linears
from a3q.stages.a3.apply import as_a3_graph, compress_model
from a3q.stages.a3.ranks import LayerRanks, plan_ranks
from a3q.stages.a3.statistics import collect_statistics

ALL = frozenset({"qk", "ov", "mlp"})


def tiny_llama(kv_heads: int = 2, bias: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=128, attention_bias=bias,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharpen attention so QK errors matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            if bias:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=128, n_inner=80)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.bias.normal_(0, 0.5)
    return model


def graph_of(model):
    return as_a3_graph(describe(model, tokenizer=None, source="tiny"))


def tokens(count: int = 6, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 96, (count, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_statistics_equal_direct_computation(kv_heads):
    graph = graph_of(tiny_llama(kv_heads))
    windows = tokens()
    stats = collect_statistics(graph, windows, set(ALL), batch_size=4, progress=False)
    captured = {}
    linears = layer_linears(graph.model, "llama", 1)
    hooks = [
        linears["q"].register_forward_hook(lambda m, a, out: captured.setdefault("q", []).append(out)),
        linears["v"].register_forward_hook(lambda m, a, out: captured.setdefault("v", []).append(out)),
        linears["o"].register_forward_pre_hook(lambda m, a: captured.setdefault("o", []).append(a[0])),
        linears["down"].register_forward_pre_hook(lambda m, a: captured.setdefault("down", []).append(a[0])),
    ]
    with torch.no_grad():
        graph.model(input_ids=windows)
    for hook in hooks:
        hook.remove()
    q = torch.cat(captured["q"]).reshape(-1, 4 * 16).double()
    n = q.shape[0]
    assert stats[1].tokens == n == windows.numel()
    for head in range(4):
        block = q[:, head * 16 : (head + 1) * 16]
        torch.testing.assert_close(stats[1].g_q[head], block.T @ block / n)
    down = torch.cat(captured["down"]).reshape(n, -1).double()
    torch.testing.assert_close(stats[1].mlp_x2, (down**2).mean(0))
    if kv_heads == 4:  # MHA: per-head o statistic, no v statistic
        o = torch.cat(captured["o"]).reshape(n, -1).double()[:, 16:32]
        torch.testing.assert_close(stats[1].g_o[1], o.T @ o / n)
        assert stats[1].g_v is None
    else:  # GQA: shared value-head statistic
        v = torch.cat(captured["v"]).reshape(n, -1).double()[:, 16:32]
        torch.testing.assert_close(stats[1].g_v[1], v.T @ v / n)
        assert stats[1].g_o is None


@pytest.mark.parametrize("make", [lambda: tiny_llama(2), lambda: tiny_llama(4, bias=True), tiny_gpt2], ids=["llama-gqa", "llama-mha-bias", "gpt2"])
def test_full_rank_through_the_maths_reproduces_logits(make):
    dense = make()
    graph = graph_of(dense)
    windows = tokens()
    stats = collect_statistics(graph, windows, set(ALL), progress=False)
    full = [LayerRanks(qk=layer.qk_head_dim, vo=layer.vo_head_dim, ff=layer.intermediate_size) for layer in graph.layers]
    compressed, results = compress_model(graph, stats, full, damping=1e-6, components=ALL, progress=False)
    probe = tokens(2, 20)
    with torch.no_grad():
        expected, actual = dense(input_ids=probe).logits, compressed.model(input_ids=probe).logits
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert all(err < 1e-9 for r in results for err in r.relative_error.values())


def test_gpt2_nope_qk_error_equals_dropped_singular_energy():
    """Layer 0 sees the same input before and after: its score error is exactly the SVD tail."""
    dense = tiny_gpt2()
    graph = graph_of(dense)
    windows = tokens(8, 32)
    stats = collect_statistics(graph, windows, {"qk"}, progress=False)
    plans = plan_ranks(graph.layers, {"qk": 0.5}, {}, 1, rope=False)
    compressed, results = compress_model(graph, stats, plans, damping=0.0, components=frozenset({"qk"}), progress=False)

    def scores(model):
        captured = {}
        attn = model.transformer.h[0].attn
        hooks = [getattr(attn, f"{n}_proj").register_forward_hook(lambda m, a, out, n=n: captured.__setitem__(n, out)) for n in "qk"]
        with torch.no_grad():
            model(input_ids=windows)
        for hook in hooks:
            hook.remove()
        q = captured["q"].double().reshape(8, 32, 4, -1).transpose(1, 2)
        k = captured["k"].double().reshape(8, 32, 4, -1).transpose(1, 2)
        return q, k

    q, k = scores(graph.model)
    q_small, k_small = scores(compressed.model)
    assert q_small.shape[-1] == 6
    # the objective couples every query with every key of the calibration set (head by head)
    q, k, q_small, k_small = (t.transpose(0, 1).reshape(4, -1, t.shape[-1]) for t in (q, k, q_small, k_small))
    error = ((q @ k.transpose(1, 2)) - (q_small @ k_small.transpose(1, 2))).square().sum()
    total = (q @ k.transpose(1, 2)).square().sum()
    assert float(error / total) == pytest.approx(results[0].relative_error["qk"] , rel=1e-6)
    assert 0 < results[0].relative_error["qk"] < 0.5


def test_rope_rank_keeps_pairs_and_records_original_indices():
    graph = graph_of(tiny_llama(2))
    stats = collect_statistics(graph, tokens(), set(ALL), progress=False)
    plans = plan_ranks(graph.layers, {"qk": 0.5}, {}, 1, rope=True)
    once, _ = compress_model(graph, stats, plans, 1e-6, frozenset({"qk"}), progress=False)
    assert once.layers[0].qk_head_dim == 8 and len(once.layers[0].rope_pairs) == 2
    assert all(len(pairs) == 4 and pairs == sorted(pairs) for pairs in once.layers[0].rope_pairs)
    # compressing again maps local pair indices back to the original ones
    stats_again = collect_statistics(once, tokens(), {"qk"}, progress=False)
    twice, _ = compress_model(once, stats_again, plan_ranks(once.layers, {"qk": 0.5}, {}, 1, rope=True), 1e-6, frozenset({"qk"}), progress=False)
    for before, after in zip(once.layers[0].rope_pairs, twice.layers[0].rope_pairs):
        assert len(after) == 2 and set(after) <= set(before)
