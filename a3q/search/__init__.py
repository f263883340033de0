"""``a3q search``: find the best composition (A³ ratio, weight quantizer, KV setting) for a budget.

The space file (:mod:`a3q.search.space`) is validated in full before anything loads; sizes come from config.json
alone (:mod:`a3q.search.sizes`); a proxy ranks every candidate from one statistics pass (:mod:`a3q.search.proxy`);
the best-ranked ones are built and measured for real by the engine (:mod:`a3q.search.driver`), and the front is
written out (:mod:`a3q.search.outputs`).
"""
