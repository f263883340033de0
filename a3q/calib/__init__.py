"""Calibration and evaluation data: real corpora, their splits, and token windows."""

from a3q.calib.corpus import CORPORA, SPLITS, corpus_text, load_articles, split_articles
from a3q.calib.windows import random_windows, sequential_windows, token_stream

__all__ = [
    "CORPORA",
    "SPLITS",
    "corpus_text",
    "load_articles",
    "random_windows",
    "sequential_windows",
    "split_articles",
    "token_stream",
]
