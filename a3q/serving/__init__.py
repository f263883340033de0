"""Serving a3q artifacts with vLLM (docs/serving.md).

* :mod:`a3q.serving.checks`: what a server may load (manifest, family, quantization), as one-line refusals;
* :mod:`a3q.serving.padding`: the head sizes an attention backend runs, exact zero padding, KV bytes per token;
* :mod:`a3q.serving.vllm`: the vLLM plugin (entry point ``vllm.general_plugins``) and its native model classes;
* :mod:`a3q.serving.command`: ``a3q serve ARTIFACT``.

Everything here except :mod:`a3q.serving.vllm` imports only the standard library, torch and a3q's light modules, so
it runs in a3q's own venv as well as in ``.venv-serve`` (where vLLM lives).
"""
