"""``a3q search``: find the best composition (A³ ratio, weight quantizer, KV setting) for a budget.

The space file (:mod:`a3q.search.space`) is validated in full before anything loads; sizes come from config.json
alone (:mod:`a3q.search.sizes`); a proxy ranks every candidate from one calibration pass on the dense model
(:mod:`a3q.search.statistics`, :mod:`a3q.search.fisher`, :mod:`a3q.search.weight_error`, :mod:`a3q.search.probes`,
:mod:`a3q.search.proxy`: an estimated KL per candidate); the best-ranked ones are built and measured for real by the
engine (:mod:`a3q.search.driver`), and the front is written out (:mod:`a3q.search.outputs`).
"""
