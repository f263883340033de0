"""A³: closed-form compression of attention (QK, OV) and MLP hidden sizes.

``linalg``, ``qk``, ``ov``, ``mlp`` hold the maths (pure functions of statistics);
``statistics`` collects those statistics, ``ranks`` turns budgets into sizes, ``compress``
and ``apply`` produce the smaller model, and ``stage`` registers the recipe stage ``a3``.
"""
