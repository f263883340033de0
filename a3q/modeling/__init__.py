"""What a3q's artifacts ship: the self-contained compressed model classes and module types.

* ``modeling_a3q_<family>``: compressed model classes (copied into artifacts, loaded there with
  ``trust_remote_code``);
* ``a3q_gptq_linear``, ``a3q_factored_linear``, ``a3q_bnb_cpu``, ``a3q_layer_shapes``, ``a3q_module_types``:
  the helpers they use.

Every file here imports only torch, transformers, the standard library and its siblings (relatively), so an artifact
loads without a3q. Registration with transformers' Auto classes and the conversion of a dense model are
:mod:`a3q.arch.auto` and :mod:`a3q.arch.convert`.
"""
