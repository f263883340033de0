"""a3q's model classes and their registration.

* ``modeling_a3q_llama`` / ``modeling_a3q_gpt2``: self-contained compressed model classes (copied into artifacts);
* ``a3q_gptq_linear``, ``a3q_factored_linear``, ``a3q_bnb_cpu``, ``a3q_layer_shapes``: self-contained helpers they use;
* ``auto``: registration with transformers' Auto classes and the remote-code export (import it to register);
* ``convert``: dense model → a3q's class at full rank.
"""
