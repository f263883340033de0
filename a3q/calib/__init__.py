"""Calibration and evaluation data: the bundled corpus and its splits (``corpus``), text sources (``sources``: the
corpus, your own files, a ``datasets`` dataset), a source's documents (``documents``: files read by ``readers`` and
``json_records``, records made documents by ``records``), their tokens (``pieces``, ``tokens``) and token windows
(``windows``)."""
