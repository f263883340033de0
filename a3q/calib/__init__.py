"""Calibration and evaluation data: real corpora and their splits (``corpus``), token windows (``windows``)."""
