"""vLLM layers for A³'s shapes, shared by the Llama and Gemma 3 model classes.

What A³ changes, computed as a3q's transformers classes compute it (a3q/modeling/modeling_a3q_llama.py):

* per layer: q/k head dim ``r_qk``, v/o head dim ``r_vo``, MLP intermediate size ``r_ff``;
* RoPE on kept frequency pairs: inside a q/k head the ``r_qk`` coordinates are ``cat(pairs, pairs + d/2)`` of the
  ORIGINAL head, with one sorted pair list per KV group (``config.rope_pairs[l][j]``); query head ``i`` uses group
  ``i // (h / h_kv)``. vLLM's rotary op applies one table to every head, so :class:`A3Attention` gathers a per-group
  cos/sin from the original ``head_dim`` table (vLLM's own ``get_rope``: same frequencies, rope scaling included);
* the softmax scale is the artifact's (``attention_scale`` / ``query_pre_attn_scalar**-0.5``), never ``P**-0.5``;
* heads are zero-padded at load to a size the attention backend runs (:mod:`a3q.serving.padding`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import get_act_and_mul_fn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import GemmaRMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import is_pp_missing_parameter, maybe_prefix
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from a3q.serving.checks import ServeRefusal
from a3q.serving.padding import BACKENDS, LayerPadding, describe, pad_heads, padding_plan, padding_summary

logger = logging.getLogger("vllm.a3q")  # a child of vLLM's logger: printed with its handlers and format

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def head_size_rule():
    """The padding rule of the attention backend vLLM will use: CPU_ATTN on a CPU, FlashAttention's otherwise."""
    return BACKENDS["cpu"] if current_platform.is_cpu() else BACKENDS["flash"]


def check_model_config(vllm_config, family: str) -> None:
    """Refuse, in one line, what the model classes do not run (the front-end check refuses these earlier)."""
    config = vllm_config.model_config.hf_config
    if getattr(config, "a3q_gptq", None) or getattr(config, "a3q_factorized", None) or vllm_config.quant_config:
        raise ServeRefusal(f"a3q's vLLM {family} class runs float A³ weights only (this artifact is quantized or "
                           f"factorized)")
    if get_tensor_model_parallel_world_size() != 1:
        raise ServeRefusal(f"a3q's vLLM plugin runs with tensor_parallel_size=1 (got "
                           f"{get_tensor_model_parallel_world_size()})")


def layer_plan(vllm_config) -> list[LayerPadding]:
    """Per-layer padded sizes for this backend (:func:`a3q.serving.padding.padding_plan`)."""
    try:
        return padding_plan(vllm_config.model_config.hf_config, head_size_rule())
    except ValueError as exc:
        raise ServeRefusal(f"a3q: {exc}") from None


def plan_and_log(vllm_config) -> list[LayerPadding]:
    """:func:`layer_plan`, with one log line saying what was padded and the KV bytes per token it costs."""
    config = vllm_config.model_config.hf_config
    plan = layer_plan(vllm_config)
    dtype_bytes = torch.tensor([], dtype=vllm_config.model_config.dtype).element_size()
    logger.info(describe(plan, config.num_key_value_heads, dtype_bytes, head_size_rule().name))
    return plan


def padding_record(vllm_config, plan: list[LayerPadding]) -> dict:
    config = vllm_config.model_config.hf_config
    dtype_bytes = torch.tensor([], dtype=vllm_config.model_config.dtype).element_size()
    return padding_summary(plan, config.num_key_value_heads, dtype_bytes, head_size_rule().name)


class A3Attention(nn.Module):
    """GQA attention at A³'s per-layer sizes, served at padded head sizes ``p_qk``/``p_v``.

    ``qk_norm``: Gemma-style per-head RMSNorm of q and k (``(1 + w)`` gains) over the ``r_qk`` kept coordinates,
    before RoPE, as a3q's Gemma 3 class computes it (whatever a3q's ``qk_norm`` mode chose, the served model is this).
    """

    def __init__(self, *, config, layer: LayerPadding, hidden_size: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, rope_parameters: dict | None, max_position: int, scale: float, qkv_bias: bool,
                 o_bias: bool, sliding_window: int | None, logits_soft_cap: float | None = None,
                 qk_norm_eps: float | None = None, cache_config=None, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.groups = num_heads // num_kv_heads
        self.r_qk, self.r_vo, self.p_qk, self.p_v = layer.r_qk, layer.r_vo, layer.p_qk, layer.p_v
        self.q_size, self.k_size, self.v_size = num_heads * self.p_qk, num_kv_heads * self.p_qk, num_kv_heads * self.p_v

        self.qkv_proj = QKVParallelLinear(hidden_size, self.p_qk, num_heads, num_kv_heads, bias=qkv_bias,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
                                          v_head_size=self.p_v)
        self.o_proj = RowParallelLinear(num_heads * self.p_v, hidden_size, bias=o_bias, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        # the ORIGINAL head_dim's table (shared by get_rope across layers); each KV group gathers its kept pairs
        self.rotary_emb = get_rope(head_dim, max_position=max_position, is_neox_style=True,
                                   rope_parameters=rope_parameters)
        pairs = config.rope_pairs[layer.layer]
        if pairs is None:
            index = torch.arange(head_dim // 2).expand(num_kv_heads, head_dim // 2)
        else:
            index = torch.tensor(pairs, dtype=torch.long).reshape(num_kv_heads, -1)
        if index.shape[1] * 2 != self.r_qk:
            raise ServeRefusal(f"a3q: layer {layer.layer} keeps {index.shape[1]} RoPE pairs per KV head but its q/k "
                               f"head dim is {self.r_qk}")
        # columns of vLLM's [cos | sin] table (d/2 each) that KV group j uses: its kept pairs' cos, then their sin
        self.register_buffer("table_index", torch.cat([index, index + head_dim // 2], dim=1).contiguous(),
                             persistent=False)
        self.qk_norm = qk_norm_eps is not None
        if self.qk_norm:
            self.q_norm = GemmaRMSNorm(self.r_qk, eps=qk_norm_eps)
            self.k_norm = GemmaRMSNorm(self.r_qk, eps=qk_norm_eps)
        self.attn = Attention(num_heads, self.p_qk, scale, num_kv_heads=num_kv_heads, cache_config=cache_config,
                              quant_config=quant_config, logits_soft_cap=logits_soft_cap,
                              per_layer_sliding_window=sliding_window, prefix=f"{prefix}.attn",
                              head_size_v=self.p_v if self.p_v != self.p_qk else None)

    def _qk(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k with the kept coordinates normed (Gemma) and rotated; the zero padding passes through.

        Within a head the kept coordinates are ``[pairs | partners]`` (``r_qk``), then the padding. The rotation is
        transformers' ``x·cos + rotate_half(x)·sin`` on the kept pairs' own frequencies. Written functionally (new
        tensors, no writes into the qkv output): Inductor compiled in-place slice writes into ~10x slower CPU code.
        """
        tokens, half, r = q.shape[0], self.r_qk // 2, self.r_qk
        table = self.rotary_emb.cos_sin_cache
        if table.dtype != q.dtype or table.device != q.device:
            table = table.to(device=q.device, dtype=q.dtype)
        cos_sin = table.index_select(0, positions)[:, self.table_index].unsqueeze(2)  # [T, h_kv, 1, r]
        cos, sin = cos_sin[..., :half], cos_sin[..., half:]
        out = []
        for x, heads, norm in ((q, self.groups, "q_norm"), (k, 1, "k_norm")):
            view = x.view(tokens, self.num_kv_heads, heads, self.p_qk)
            kept = getattr(self, norm)(view[..., :r].contiguous()) if self.qk_norm else view[..., :r]
            x1, x2 = kept[..., :half], kept[..., half:]
            parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
            if self.p_qk != r:
                parts.append(view[..., r:])  # exact zeros (zero weight rows)
            out.append(torch.cat(parts, dim=-1).reshape(tokens, -1))
        return out[0], out[1]

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.k_size, self.v_size], dim=-1)
        q, k = self._qk(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output

    def pad_checkpoint(self, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        """An artifact tensor at this layer's served size: q/k/v rows (weights and biases), o_proj columns."""
        if kind == "q":
            return pad_heads(tensor, self.num_heads, self.r_qk, self.p_qk, dim=0)
        if kind == "k":
            return pad_heads(tensor, self.num_kv_heads, self.r_qk, self.p_qk, dim=0)
        if kind == "v":
            return pad_heads(tensor, self.num_kv_heads, self.r_vo, self.p_v, dim=0)
        if kind == "o":
            return pad_heads(tensor, self.num_heads, self.r_vo, self.p_v, dim=1)
        raise ValueError(kind)


class A3MLP(nn.Module):
    """Gated MLP (SwiGLU / GeGLU) at this layer's intermediate size ``r_ff``, served at ``p_ff`` (a multiple of
    :data:`~a3q.serving.padding.MLP_MULTIPLE`): zero gate/up rows and zero down_proj columns, exact because
    ``act(0)·0 = 0``; measured on this CPU, oneDNN's bf16 down_proj with 1228 inputs took 1.8x the time of 1248."""

    def __init__(self, hidden_size: int, layer: LayerPadding, act: str, bias: bool = False, quant_config=None,
                 prefix: str = "") -> None:
        super().__init__()
        self.r_ff, self.p_ff = layer.r_ff, layer.p_ff
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [self.p_ff] * 2, bias=bias,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(self.p_ff, hidden_size, bias=bias, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = get_act_and_mul_fn(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x

    def pad_checkpoint(self, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        """gate/up rows (weights and biases), down_proj columns, at the served size."""
        if kind in ("gate", "up"):
            return pad_heads(tensor, 1, self.r_ff, self.p_ff, dim=0)
        if kind == "down":
            return pad_heads(tensor, 1, self.r_ff, self.p_ff, dim=1)
        raise ValueError(kind)


_STACKED = (
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
)


def load_a3_weights(model: nn.Module, layers: nn.ModuleList, weights: Iterable[tuple[str, torch.Tensor]],
                    tied: bool) -> set[str]:
    """Load an artifact's safetensors (vLLM iterates every shard) into ``model``, padding attention as served.

    Names are Hugging Face's (``model.layers.N.self_attn.q_proj.weight`` …); q/k/v go into the fused ``qkv_proj``
    and gate/up into ``gate_up_proj`` through their parameters' own weight loaders. Returns the loaded names, which
    vLLM compares with the model's parameters (a missing tensor is an error there).
    """
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name or (tied and name.startswith("lm_head.")):
            continue
        match = _LAYER.search(name)
        layer = layers[int(match.group(1))] if match else None
        for fused, original, shard in _STACKED:
            if original not in name:
                continue
            target = name.replace(original, fused)
            if is_pp_missing_parameter(target, model):
                break
            if isinstance(shard, str):
                tensor = layer.self_attn.pad_checkpoint(shard, tensor)
            else:
                tensor = layer.mlp.pad_checkpoint(("gate", "up")[shard], tensor)
            param = params[target]
            param.weight_loader(param, tensor, shard)
            loaded.add(target)
            break
        else:
            if is_pp_missing_parameter(name, model):
                continue
            if layer is not None and name.endswith(".self_attn.o_proj.weight"):
                tensor = layer.self_attn.pad_checkpoint("o", tensor)
            elif layer is not None and name.endswith(".mlp.down_proj.weight"):
                tensor = layer.mlp.pad_checkpoint("down", tensor)
            if name not in params:
                raise ServeRefusal(f"a3q: the artifact holds {name}, which the served model has no place for")
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
    return loaded


class A3CausalLM(nn.Module):
    """What both families' causal-LM classes share: the LM head over ``self.model`` (tied to its embeddings when the
    config says so), logits, and the A³ weight loading. A subclass builds ``self.model`` and ``self.logits_processor``
    (its family's scale or soft-cap)."""

    def lm_head_for(self, vllm_config, prefix: str) -> nn.Module:
        config = vllm_config.model_config.hf_config
        head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                              prefix=maybe_prefix(prefix, "lm_head"))
        return head.tie_weights(self.model.embed_tokens) if config.tie_word_embeddings else head

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_a3_weights(self, self.model.layers, weights, tied=bool(self.config.tie_word_embeddings))
