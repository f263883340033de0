"""Calibration and evaluation data: the bundled corpus and its splits (``corpus``), text sources (``sources``:
the corpus, your own files, a ``datasets`` dataset), token windows (``windows``)."""
