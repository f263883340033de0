"""A3LlamaForCausalLM: conversion, RoPE-pair / v-o / MLP layouts, KV cache, remote-code export.

All models are tiny, random, float32 and seeded. The layout tests compare the A³ model against the DENSE model
with the dropped rows/columns zeroed: both compute exactly the same function, so any mistake in coordinate order,
pair partner, kept frequency, GQA grouping or softmax scale shows up as a logits mismatch.
"""

import copy

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from a3q.arch.auto import (
    A3LlamaForCausalLM,
    a3_config_from_dense,
    a3_model_from_state_dict,
    is_a3_model,
    save_with_remote_code,
    to_a3_model,
)
from tests.remote_code import remote_code_logits
from tests.modeling.random_weights import sharpen_llama

V, D_M, H, H_KV, D, L, FF = 128, 64, 4, 2, 16, 2, 96
G = H // H_KV
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def make_dense(kind: str, seed: int = 0, attn: str = "sdpa") -> torch.nn.Module:
    """Tiny dense model with non-trivial biases/norms and sharpened q/k (so attention is far from uniform)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=V, hidden_size=D_M, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=H_KV, max_position_embeddings=256, attn_implementation=attn,
    )
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, head_dim=D, sliding_window=None))
    else:
        extra = {
            "llama": {},
            "llama_tied": {"tie_word_embeddings": True},
            "llama_bias": {"attention_bias": True, "mlp_bias": True},
            "llama3": {"rope_parameters": LLAMA3_ROPE},
        }[kind]
        model = LlamaForCausalLM(LlamaConfig(**common, head_dim=D, **extra))
    return sharpen_llama(model)


def logits(model: torch.nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw).logits


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def ids(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- full-rank conversion


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "llama_bias", "llama3", "qwen2", "mistral"])
def test_full_rank_conversion_matches_dense(kind: str) -> None:
    dense = make_dense(kind)
    a3 = to_a3_model(dense)
    assert isinstance(a3, A3LlamaForCausalLM) and is_a3_model(a3) and not is_a3_model(dense)
    assert a3.config.qk_head_dims == [D] * L and a3.config.attention_scale == D**-0.5
    if kind == "qwen2":
        assert a3.config.qkv_bias and not a3.config.o_bias
        assert a3.model.layers[0].self_attn.o_proj.bias is None
    if kind == "llama_tied":
        assert a3.lm_head.weight is a3.model.embed_tokens.weight
    x = ids()
    assert max_rel_diff(logits(a3, x), logits(dense, x)) <= 1e-5
    # weights are copies: the dense reference is not aliased
    q_a3, q_dense = a3.model.layers[0].self_attn.q_proj.weight, dense.model.layers[0].self_attn.q_proj.weight
    assert q_a3.data_ptr() != q_dense.data_ptr()


def test_conversion_keeps_dtype() -> None:
    dense = make_dense("llama").to(torch.bfloat16)
    a3 = to_a3_model(dense)
    assert a3.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
    x = ids()
    assert torch.equal(logits(a3, x), logits(dense, x))


# ---------------------------------------------------------------- layout tests (zeroed dense == smaller A³)


def pick(gen: torch.Generator, n: int, k: int) -> list[int]:
    return sorted(torch.randperm(n, generator=gen)[:k].tolist())


def qk_coords(pairs: list[int], order: str = "documented") -> list[int]:
    if order == "interleaved":  # a plausible but WRONG layout: (p, p + d/2) adjacent
        return [c for p in pairs for c in (p, p + D // 2)]
    return list(pairs) + [p + D // 2 for p in pairs]


def rows(coords_per_head: list[list[int]]) -> torch.Tensor:
    return torch.tensor([i * D + c for i, cs in enumerate(coords_per_head) for c in cs])


def zero_except(t: torch.Tensor, keep: torch.Tensor, dim: int) -> None:
    mask = torch.ones(t.shape[dim], dtype=torch.bool)
    mask[keep] = False
    with torch.no_grad():
        t.index_fill_(dim, mask.nonzero().squeeze(1), 0.0)


def compress(dense, qk_pairs=None, vo_keep=None, ff_keep=None, order="documented", **cfg_over):
    """(dense with dropped rows/cols zeroed, A³ model holding only the kept rows/cols)."""
    zeroed = copy.deepcopy(dense)
    over = dict(cfg_over)
    if qk_pairs is not None:
        over.update(qk_head_dims=[2 * len(p[0]) for p in qk_pairs], rope_pairs=qk_pairs)
    if vo_keep is not None:
        over["vo_head_dims"] = [len(k[0]) for k in vo_keep]
    if ff_keep is not None:
        over["intermediate_sizes"] = [len(k) for k in ff_keep]
    sd = {k: v.clone() for k, v in dense.state_dict().items()}
    for l in range(L):
        pre = f"model.layers.{l}."
        attn, mlp = zeroed.model.layers[l].self_attn, zeroed.model.layers[l].mlp
        if qk_pairs is not None:
            kv_coords = [qk_coords(p, order) for p in qk_pairs[l]]
            q_rows, k_rows = rows([kv_coords[i // G] for i in range(H)]), rows(kv_coords)
            for proj, r in (("q_proj", q_rows), ("k_proj", k_rows)):
                for p_name in ("weight", "bias"):
                    if getattr(getattr(attn, proj), p_name) is not None:
                        sd[f"{pre}self_attn.{proj}.{p_name}"] = sd[f"{pre}self_attn.{proj}.{p_name}"][r]
                        zero_except(getattr(getattr(attn, proj), p_name), r, 0)
        if vo_keep is not None:
            v_rows, o_cols = rows(vo_keep[l]), rows([vo_keep[l][i // G] for i in range(H)])
            sd[f"{pre}self_attn.v_proj.weight"] = sd[f"{pre}self_attn.v_proj.weight"][v_rows]
            zero_except(attn.v_proj.weight, v_rows, 0)
            if attn.v_proj.bias is not None:
                sd[f"{pre}self_attn.v_proj.bias"] = sd[f"{pre}self_attn.v_proj.bias"][v_rows]
                zero_except(attn.v_proj.bias, v_rows, 0)
            sd[f"{pre}self_attn.o_proj.weight"] = sd[f"{pre}self_attn.o_proj.weight"][:, o_cols]
            zero_except(attn.o_proj.weight, o_cols, 1)
        if ff_keep is not None:
            keep = torch.tensor(ff_keep[l])
            for proj in ("gate_proj", "up_proj"):
                sd[f"{pre}mlp.{proj}.weight"] = sd[f"{pre}mlp.{proj}.weight"][keep]
                zero_except(getattr(mlp, proj).weight, keep, 0)
                if getattr(mlp, proj).bias is not None:
                    sd[f"{pre}mlp.{proj}.bias"] = sd[f"{pre}mlp.{proj}.bias"][keep]
                    zero_except(getattr(mlp, proj).bias, keep, 0)
            sd[f"{pre}mlp.down_proj.weight"] = sd[f"{pre}mlp.down_proj.weight"][:, keep]
            zero_except(mlp.down_proj.weight, keep, 1)
    if dense.config.tie_word_embeddings:
        del sd["lm_head.weight"]
    # builds on the meta device and assigns the kept rows (the path the A³ stage uses)
    a3 = a3_model_from_state_dict(a3_config_from_dense(dense.config, **over), sd)
    assert type(a3) is A3LlamaForCausalLM
    return zeroed, a3


def random_qk_pairs(seed: int = 0, n_pairs=(5, 3)) -> list[list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    pairs = [[pick(gen, D // 2, n) for _ in range(H_KV)] for n in n_pairs]
    for layer in pairs:  # the point of the test: groups (and layers) keep different frequencies
        assert layer[0] != layer[1]
    return pairs


def random_vo_keep(seed: int = 0, sizes=(12, 7)) -> list[list[list[int]]]:
    gen = torch.Generator().manual_seed(seed + 100)
    return [[pick(gen, D, n) for _ in range(H_KV)] for n in sizes]


def random_ff_keep(seed: int = 0, sizes=(40, 71)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed + 200)
    return [pick(gen, FF, n) for n in sizes]


POS = torch.arange(16).unsqueeze(0) + 29  # non-zero positions: every kept frequency must rotate correctly


@pytest.mark.parametrize("kind", ["llama_bias", "qwen2", "llama3", "llama_tied"])
@pytest.mark.parametrize("parts", ["qk", "vo", "mlp", "qk+vo+mlp"])
def test_kept_rows_equal_zeroed_dense(kind: str, parts: str) -> None:
    dense = make_dense(kind)
    kw = {}
    if "qk" in parts:
        kw["qk_pairs"] = random_qk_pairs()
    if "vo" in parts:
        kw["vo_keep"] = random_vo_keep()
    if "mlp" in parts:
        kw["ff_keep"] = random_ff_keep()
    zeroed, a3 = compress(dense, **kw)
    x = ids()
    ref = logits(zeroed, x, position_ids=POS)
    assert max_rel_diff(ref, logits(dense, x, position_ids=POS)) > 1e-2  # zeroing really changed the model
    assert max_rel_diff(logits(a3, x, position_ids=POS), ref) <= 1e-5
    if "qk" in parts:
        assert a3.model.layers[1].self_attn.q_proj.weight.shape == (H * 6, D_M)
    if "vo" in parts:
        assert a3.model.layers[1].self_attn.o_proj.weight.shape == (D_M, H * 7)


@pytest.mark.parametrize("bug", ["interleaved_layout", "scale_from_r_qk"])
def test_layout_test_detects_bugs(bug: str) -> None:
    """Negative control: the comparison above is sensitive to the two classic mistakes."""
    dense = make_dense("llama_bias")
    kw = {"order": "interleaved"} if bug == "interleaved_layout" else {"attention_scale": 10**-0.5}
    zeroed, a3 = compress(dense, qk_pairs=random_qk_pairs(), **kw)
    x = ids()
    assert max_rel_diff(logits(a3, x, position_ids=POS), logits(zeroed, x, position_ids=POS)) > 1e-3


# ---------------------------------------------------------------- cache, generate, attention backends

COMPRESSED = dict(
    qk_head_dims=[10, 6],
    vo_head_dims=[12, 6],  # layer 0: r_qk != r_vo; layer 1: equal (SDPA native-GQA path)
    intermediate_sizes=[40, 72],
    rope_pairs=[[[0, 2, 3, 5, 7], [1, 2, 4, 5, 6]], [[0, 1, 7], [3, 4, 6]]],
)


def compressed_model(attn: str) -> A3LlamaForCausalLM:
    dense = make_dense("llama_bias", attn=attn)
    return compress(dense, qk_pairs=COMPRESSED["rope_pairs"], vo_keep=random_vo_keep(sizes=(12, 6)),
                    ff_keep=random_ff_keep(sizes=(40, 72)))[1]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_incremental_decoding_and_generate(attn: str) -> None:
    model = compressed_model(attn)
    assert model.config._attn_implementation == attn
    x = ids(seq=12)
    full = logits(model, x)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        steps = [model(x[:, :7], past_key_values=cache, use_cache=True).logits]
        for t in range(7, 12):
            steps.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert max_rel_diff(torch.cat(steps, dim=1), full) <= 1e-5
    assert cache.layers[0].keys.shape == (2, H_KV, 12, 10) and cache.layers[0].values.shape == (2, H_KV, 12, 12)
    assert cache.layers[1].keys.shape[-1] == 6

    out = model.generate(x, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 17)
    seq = x
    for _ in range(5):  # greedy without cache must give the same tokens
        seq = torch.cat([seq, logits(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_padded_batch_incremental() -> None:
    model = compressed_model("sdpa")
    x, mask = ids(seq=12), torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0  # left padding exercises the explicit-mask SDPA paths
    full = logits(model, x, attention_mask=mask)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        steps = [model(x[:, :7], attention_mask=mask[:, :7], past_key_values=cache, use_cache=True).logits]
        for t in range(7, 12):
            steps.append(model(x[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache).logits)
    inc = torch.cat(steps, dim=1)
    assert max_rel_diff(inc[0, 3:], full[0, 3:]) <= 1e-5 and max_rel_diff(inc[1], full[1]) <= 1e-5


def test_sdpa_and_eager_agree() -> None:
    model = compressed_model("sdpa")
    x = ids(seq=12)
    ref = logits(model, x)
    model.set_attn_implementation("eager")
    assert max_rel_diff(logits(model, x), ref) <= 1e-5


# ---------------------------------------------------------------- export / reload

def test_save_with_remote_code_roundtrip(tmp_path) -> None:
    model = compressed_model("sdpa")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    x = ids(seq=12)
    ref = logits(model, x)
    out_dir = tmp_path / "export"
    save_with_remote_code(model, out_dir)
    assert (out_dir / "modeling_a3q_llama.py").is_file() and (out_dir / "model.safetensors").is_file()

    remote = remote_code_logits(out_dir, x, "A3LlamaForCausalLM")
    assert torch.equal(remote, ref)

    local = AutoModelForCausalLM.from_pretrained(out_dir).eval()  # registered by `import a3q.modeling`
    assert type(local) is A3LlamaForCausalLM
    assert local.config.rope_pairs == COMPRESSED["rope_pairs"] and local.config.vo_head_dims == [12, 6]
    assert local.lm_head.weight is local.model.embed_tokens.weight
    assert torch.equal(local.model.layers[0].self_attn.rope_index, model.model.layers[0].self_attn.rope_index)
    assert torch.equal(logits(local, x), ref)


# ---------------------------------------------------------------- refusals and validation


@pytest.mark.parametrize(
    "bad",
    [
        {"qk_head_dims": [7, 16]},
        {"qk_head_dims": [8, 16]},  # smaller r_qk needs rope_pairs
        {"qk_head_dims": [4, 16], "rope_pairs": [[[1, 0], [2, 3]], None]},  # unsorted
        {"qk_head_dims": [4, 16], "rope_pairs": [[[0, 8], [2, 3]], None]},  # out of range
        {"qk_head_dims": [4, 16], "rope_pairs": [[[0, 1]], None]},  # one list per KV head
        {"vo_head_dims": [16]},
    ],
)
def test_config_validation(bad: dict) -> None:
    base = LlamaConfig(vocab_size=V, hidden_size=D_M, num_hidden_layers=L, num_attention_heads=H,
                       num_key_value_heads=H_KV)
    with pytest.raises(ValueError):
        a3_config_from_dense(base, **bad)
