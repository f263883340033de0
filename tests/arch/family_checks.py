"""The four checks every family adapter passes on a tiny random config, written once for all families.

1. Full-rank conversion reproduces the dense Hugging Face model bit for bit.
2. A compressed model built from kept rows/columns equals the full-rank model with every other row/column zeroed
   (q/k norms over the kept coordinates: the zeroed model's gains are scaled by ``sqrt(r/d)``, ε ≈ 0).
3. Decoding token by token through the KV cache equals one full forward.
4. An export loads with remote code alone (no a3q in the loading process) and gives the same logits.
5. The calibration pipeline's layer-by-layer run (each layer alone on captured inputs and call kwargs: masks per
   attention type, RoPE tables) scores windows as the whole-model forward does, before and after the A³ stage, and
   the stage shrinks every layer.

The kept coordinates are chosen at random per layer; everything is read from the family's adapter (linear paths,
q/k norm paths and their ``1 + w`` offset), so a new family reuses these checks by naming a tiny dense model.
"""

from __future__ import annotations

import copy
import math

import torch

from a3q.arch import adapter, describe
from a3q.metrics.layerwise import layerwise_window_nll
from a3q.engine import apply_stage
from a3q.pipeline.runner import LayerProbe
from a3q.arch.auto import (a3_config_from_dense, a3_model_from_state_dict, remote_code_entry, save_with_remote_code,
                               to_a3_model)
from tests.decoding import incremental_logits
from tests.remote_code import remote_code_logits


def token_ids(vocab: int, batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def _keep_rows(state: dict, module, key: str, rows: torch.Tensor) -> None:
    """Keep ``rows`` of ``key``'s weight and bias in ``state``; zero the others in ``module``."""
    for kind in ("weight", "bias"):
        tensor = getattr(module, kind, None)
        if tensor is None:
            continue
        state[f"{key}.{kind}"] = state[f"{key}.{kind}"][rows]
        dropped = torch.ones(tensor.shape[0], dtype=torch.bool)
        dropped[rows] = False
        tensor[dropped] = 0.0


def _keep_columns(state: dict, module, key: str, columns: torch.Tensor) -> None:
    state[f"{key}.weight"] = state[f"{key}.weight"][:, columns]
    dropped = torch.ones(module.weight.shape[1], dtype=torch.bool)
    dropped[columns] = False
    module.weight[:, dropped] = 0.0


@torch.no_grad()
def compressed_and_zeroed(full, r_qk: int, r_vo: int, r_ff: int, seed: int = 3):
    """(compressed model from kept rows, copy of the full-rank A³ model ``full`` with the other rows zeroed)."""
    family, config = adapter(full.config), full.config
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    count, ff = config.num_hidden_layers, config.intermediate_size
    gen = torch.Generator().manual_seed(seed)
    pairs = [sorted(torch.randperm(d // 2, generator=gen)[: r_qk // 2].tolist()) for _ in range(count)]
    state, zeroed = {k: v.clone() for k, v in full.state_dict().items()}, copy.deepcopy(full)
    for index in range(count):
        vo = torch.randperm(d, generator=gen)[:r_vo].sort().values
        kept_ff = torch.randperm(ff, generator=gen)[:r_ff].sort().values
        qk = torch.tensor(pairs[index] + [p + d // 2 for p in pairs[index]])
        layer, prefix = zeroed.get_submodule(family.layers_path)[index], family.layer_prefix.format(index=index)
        rows = {"q": torch.cat([h * d + qk for h in range(heads)]), "k": torch.cat([h * d + qk for h in range(kv_heads)]),
                "v": torch.cat([h * d + vo for h in range(kv_heads)]), "gate": kept_ff, "up": kept_ff}
        for name, kept in rows.items():
            path = family.linear_paths[name]
            _keep_rows(state, layer.get_submodule(path), prefix + path, kept)
        for name, kept in (("o", torch.cat([h * d + vo for h in range(heads)])), ("down", kept_ff)):
            path = family.linear_paths[name]
            _keep_columns(state, layer.get_submodule(path), prefix + path, kept)
        for path in family.qk_norm_paths or ():
            norm, offset = layer.get_submodule(path), family.norm_weight_offset
            state[f"{prefix}{path}.weight"] = state[f"{prefix}{path}.weight"][qk]
            norm.weight[qk] = (offset + norm.weight[qk]) * math.sqrt(r_qk / d) - offset
    compressed_config = a3_config_from_dense(config, qk_head_dims=[r_qk] * count, vo_head_dims=[r_vo] * count,
                                             intermediate_sizes=[r_ff] * count,
                                             rope_pairs=[[p] * kv_heads for p in pairs])
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return a3_model_from_state_dict(compressed_config, state), zeroed


def check_family(dense, tmp_path, *, r_qk: int, r_vo: int, r_ff: int, seq: int = 12, prefix: int = 5,
                 tolerance: float = 1e-5, bit_identical: bool = True) -> None:
    """All four checks on the tiny dense model ``dense`` (see the module docstring).

    ``bit_identical=False`` for families whose dense class computes on fused tensors: Phi-3's SiLU runs on a strided
    half of ``gate_up_proj``'s output, which takes PyTorch's scalar path instead of the vectorised one (last-bit
    differences, 1e-7 relative), so full rank is compared at 1e-6.
    """
    vocab = dense.config.vocab_size
    full = to_a3_model(dense)
    ids = token_ids(vocab, seq=seq)
    assert full.config.model_type == adapter(dense.config).compressed_type
    if bit_identical:
        assert torch.equal(logits(full, ids), logits(dense, ids)), "full-rank conversion is not bit-identical"
    else:
        torch.testing.assert_close(logits(full, ids), logits(dense, ids), rtol=1e-6, atol=1e-6)

    compressed, zeroed = compressed_and_zeroed(full, r_qk, r_vo, r_ff)
    expected = logits(zeroed, ids)
    torch.testing.assert_close(logits(compressed, ids), expected, rtol=100 * tolerance, atol=tolerance)
    torch.testing.assert_close(incremental_logits(compressed, ids, prefix=prefix), expected,
                               rtol=100 * tolerance, atol=tolerance)

    save_with_remote_code(compressed, tmp_path / "export")
    stem, class_name = remote_code_entry(compressed.config.model_type)
    assert (tmp_path / "export" / f"{stem}.py").is_file()
    assert torch.equal(remote_code_logits(tmp_path / "export", ids, class_name), logits(compressed, ids))

    check_pipeline(full)


@torch.no_grad()
def _window_nll(model, windows: torch.Tensor) -> torch.Tensor:
    out = logits(model, windows).double()
    nll = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), windows[:, 1:].reshape(-1),
                                            reduction="none")
    return nll.reshape(windows.shape[0], -1).sum(1)


def check_pipeline(full, ratio: float = 0.3) -> None:
    """Check 5 on the full-rank A³ model ``full`` (changed in place by the stage)."""
    windows = token_ids(full.config.vocab_size, batch=4, seq=16, seed=7)
    graph = describe(full, None, "tiny")
    torch.testing.assert_close(layerwise_window_nll(graph, windows, 2, progress=False), _window_nll(full, windows),
                               rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # global allocation's probe scores the distribution the model's forward gives (soft-caps)
        expected = torch.log_softmax(full(input_ids=windows[:2]).logits.double(), dim=-1).float()
    torch.testing.assert_close(LayerProbe(graph, windows[:2]).reference, expected,
                               rtol=1e-5, atol=1e-5)
    before = [(layer.qk_head_dim, layer.vo_head_dim, layer.intermediate_size) for layer in graph.layers]
    graph, _ = apply_stage(graph, "a3", windows=windows, ratio=ratio, allocation="uniform", batch_size=2)
    after = [(layer.qk_head_dim, layer.vo_head_dim, layer.intermediate_size) for layer in graph.layers]
    assert all(sum(a) < sum(b) for a, b in zip(after, before)), (before, after)
    nll = _window_nll(graph.model, windows)
    assert torch.isfinite(nll).all()
    torch.testing.assert_close(layerwise_window_nll(graph, windows, 2, progress=False), nll, rtol=1e-6, atol=1e-6)
