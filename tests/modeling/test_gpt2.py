"""A3GPT2ForCausalLM: Conv1D -> Linear conversion, q/k, v/o and MLP layouts, KV cache, remote-code export."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config, GPT2LMHeadModel

from a3q.arch.auto import (
    A3GPT2Config,
    A3GPT2ForCausalLM,
    a3_config_from_dense,
    is_a3_model,
    save_with_remote_code,
    to_a3_model,
)
from tests.remote_code import remote_code_logits

V, D_M, H, L, FF = 128, 64, 4, 2, 256
D = D_M // H


def make_dense(seed: int = 0, attn: str = "sdpa", **extra) -> GPT2LMHeadModel:
    """Tiny GPT-2 with random biases/LayerNorms and sharpened q/k so attention is far from uniform."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_embd=D_M, n_layer=L, n_head=H, n_positions=64, bos_token_id=0, eos_token_id=0,
                     attn_implementation=attn, **extra)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif ".ln_" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("c_attn.weight"):
                p[:, : 2 * D_M].mul_(4.0)
    return model.eval()


def logits(model: torch.nn.Module, ids_: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids_, **kw).logits


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def ids(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("extra", [{}, {"scale_attn_weights": False}, {"tie_word_embeddings": False}])
def test_full_rank_conversion_matches_dense(extra: dict) -> None:
    dense = make_dense(**extra)
    a3 = to_a3_model(dense)
    assert isinstance(a3, A3GPT2ForCausalLM) and is_a3_model(a3)
    attn = a3.transformer.h[0].attn
    assert attn.q_proj.weight.shape == (D_M, D_M) and attn.o_proj.bias is not None
    assert (a3.lm_head.weight is a3.transformer.wte.weight) == dense.config.tie_word_embeddings
    x = ids()
    assert max_rel_diff(logits(a3, x), logits(dense, x)) <= 1e-5


def pick(gen: torch.Generator, n: int, k: int) -> list[int]:
    # GPT-2 has no RoPE: any subset, in any order, is a valid basis choice
    return torch.randperm(n, generator=gen)[:k].tolist()


def rows(coords_per_head: list[list[int]]) -> torch.Tensor:
    return torch.tensor([i * D + c for i, cs in enumerate(coords_per_head) for c in cs])


def compress(dense: GPT2LMHeadModel, qk=None, vo=None, ff=None, **cfg_over):
    """(dense with dropped Conv1D rows/cols zeroed, smaller A3GPT2 holding the kept ones)."""
    zeroed, full = copy.deepcopy(dense), to_a3_model(dense)
    over = dict(cfg_over)
    if qk is not None:
        over["qk_head_dims"] = [len(k[0]) for k in qk]
    if vo is not None:
        over["vo_head_dims"] = [len(k[0]) for k in vo]
    if ff is not None:
        over["intermediate_sizes"] = [len(k) for k in ff]
    a3 = A3GPT2ForCausalLM(a3_config_from_dense(dense.config, **over)).eval()
    sd = dict(full.state_dict())
    with torch.no_grad():
        for l in range(L):
            pre, block = f"transformer.h.{l}.", zeroed.transformer.h[l]
            w, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # Conv1D: [in, 3*out]
            if qk is not None:
                r = rows(qk[l])
                for j, proj in enumerate(("q_proj", "k_proj")):
                    sd[f"{pre}attn.{proj}.weight"] = sd[f"{pre}attn.{proj}.weight"][r]
                    sd[f"{pre}attn.{proj}.bias"] = sd[f"{pre}attn.{proj}.bias"][r]
                    drop = torch.ones(D_M, dtype=torch.bool)
                    drop[r] = False
                    w[:, j * D_M : (j + 1) * D_M][:, drop] = 0.0
                    b[j * D_M : (j + 1) * D_M][drop] = 0.0
            if vo is not None:
                r = rows(vo[l])
                sd[f"{pre}attn.v_proj.weight"] = sd[f"{pre}attn.v_proj.weight"][r]
                sd[f"{pre}attn.v_proj.bias"] = sd[f"{pre}attn.v_proj.bias"][r]
                sd[f"{pre}attn.o_proj.weight"] = sd[f"{pre}attn.o_proj.weight"][:, r]
                drop = torch.ones(D_M, dtype=torch.bool)
                drop[r] = False
                w[:, 2 * D_M :][:, drop] = 0.0
                b[2 * D_M :][drop] = 0.0
                block.attn.c_proj.weight[drop] = 0.0  # Conv1D [in, out]: input rows
            if ff is not None:
                keep = torch.tensor(ff[l])
                sd[f"{pre}mlp.c_fc.weight"] = sd[f"{pre}mlp.c_fc.weight"][keep]
                sd[f"{pre}mlp.c_fc.bias"] = sd[f"{pre}mlp.c_fc.bias"][keep]
                sd[f"{pre}mlp.c_proj.weight"] = sd[f"{pre}mlp.c_proj.weight"][:, keep]
                drop = torch.ones(FF, dtype=torch.bool)
                drop[keep] = False
                block.mlp.c_fc.weight[:, drop] = 0.0
                block.mlp.c_fc.bias[drop] = 0.0
                block.mlp.c_proj.weight[drop] = 0.0
    a3.load_state_dict(sd, strict=True)
    return zeroed, a3


def keep_sets(seed: int, n: int, sizes) -> list[list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    return [[pick(gen, n, k) for _ in range(H)] for k in sizes]


QK, VO = keep_sets(0, D, (10, 5)), keep_sets(1, D, (12, 7))
FF_KEEP = [torch.randperm(FF, generator=torch.Generator().manual_seed(2))[:k].tolist() for k in (100, 37)]


@pytest.mark.parametrize("parts", ["qk", "vo", "mlp", "qk+vo+mlp"])
def test_kept_rows_equal_zeroed_dense(parts: str) -> None:
    dense = make_dense()
    kw = {"qk": QK if "qk" in parts else None, "vo": VO if "vo" in parts else None,
          "ff": FF_KEEP if "mlp" in parts else None}
    zeroed, a3 = compress(dense, **kw)
    x = ids()
    ref = logits(zeroed, x)
    assert max_rel_diff(ref, logits(dense, x)) > 1e-2  # zeroing really changed the model
    assert max_rel_diff(logits(a3, x), ref) <= 1e-5


def test_scale_must_stay_original() -> None:
    """Negative control: a scale derived from r_qk is detected by the comparison above."""
    zeroed, a3 = compress(make_dense(), qk=QK, attention_scale=10**-0.5)
    x = ids()
    assert max_rel_diff(logits(a3, x), logits(zeroed, x)) > 1e-3


def compressed_model(attn: str) -> A3GPT2ForCausalLM:
    return compress(make_dense(attn=attn), qk=QK, vo=VO, ff=FF_KEEP)[1]


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
    assert cache.layers[0].keys.shape == (2, H, 12, 10) and cache.layers[0].values.shape == (2, H, 12, 12)

    out = model.generate(x, max_new_tokens=5, do_sample=False)
    seq = x
    for _ in range(5):
        seq = torch.cat([seq, logits(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sdpa_and_eager_agree() -> None:
    model = compressed_model("sdpa")
    x = ids(seq=12)
    ref = logits(model, x)
    model.set_attn_implementation("eager")
    assert max_rel_diff(logits(model, x), ref) <= 1e-5


def test_save_with_remote_code_roundtrip(tmp_path) -> None:
    model = compressed_model("sdpa")
    x = ids(seq=12)
    ref = logits(model, x)
    out_dir = tmp_path / "export"
    save_with_remote_code(model, out_dir)
    assert (out_dir / "modeling_a3q_gpt2.py").is_file()

    assert torch.equal(remote_code_logits(out_dir, x, "A3GPT2ForCausalLM"), ref)

    local = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert type(local) is A3GPT2ForCausalLM and local.config.qk_head_dims == [10, 5]
    assert local.lm_head.weight is local.transformer.wte.weight
    assert torch.equal(logits(local, x), ref)


@pytest.mark.parametrize("bad", [{"scale_attn_by_inverse_layer_idx": True}, {"reorder_and_upcast_attn": True}])
def test_unsupported_gpt2_options_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="not support"):
        to_a3_model(make_dense(**bad))
    with pytest.raises(ValueError):
        A3GPT2Config(n_embd=D_M, n_layer=L, n_head=H, **bad)


def test_config_lengths_are_validated() -> None:
    with pytest.raises(ValueError, match="qk_head_dims"):
        A3GPT2Config(n_embd=D_M, n_layer=L, n_head=H, qk_head_dims=[8])
