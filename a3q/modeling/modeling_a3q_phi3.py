"""A³-compressed Phi-3 causal LM: ``modeling_a3q_llama`` under its own model type.

Phi-3's layers compute what Llama's do; only its weights are stored fused (``qkv_proj``, ``gate_up_proj``). After A³
the q/k, v/o and MLP hidden sizes differ, so a3q keeps them as separate Llama-named linears (split on load by
``a3q.arch.phi3``). The own model type keeps the family known when an artifact is loaded back. Phi-3's residual
dropout (``resid_pdrop``, 0 in the released models) is not applied. Self-contained (torch + transformers + the sibling
files): it is copied next to exported weights for ``trust_remote_code``.
"""

from .modeling_a3q_llama import A3LlamaConfig, A3LlamaForCausalLM, A3LlamaModel

__all__ = ["A3Phi3Config", "A3Phi3Model", "A3Phi3ForCausalLM"]


class A3Phi3Config(A3LlamaConfig):
    """Llama-style A³ config for Phi-3 (per-layer shapes; every layer slides when ``sliding_window`` is set)."""

    model_type = "a3q_phi3"

    #: the context length ``longrope`` scaling switches at (Phi-3's own field, read by transformers' RoPE code)
    original_max_position_embeddings: int | None = None


class A3Phi3Model(A3LlamaModel):
    config_class = A3Phi3Config


class A3Phi3ForCausalLM(A3LlamaForCausalLM):
    config_class = A3Phi3Config
    base_model_class = A3Phi3Model
