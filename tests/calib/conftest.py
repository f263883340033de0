"""Fixtures of the text-source tests: the real tokenizers (no model is loaded), short real documents, and a
``datasets`` cache of the test's own."""

from __future__ import annotations

import pytest

from a3q.assets.corpus import load_articles, split_articles


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    """SmolLM2's tokenizer (byte-level BPE, GPT-2 pre-tokenizer regex, a chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path))


@pytest.fixture(scope="session")
def gemma_tokenizer():
    """Gemma 3's tokenizer (SentencePiece-style BPE: spaces become '▁', byte fallback, newline runs as added tokens)."""
    from transformers import AutoTokenizer

    from a3q.assets.models import gemma3_path

    return AutoTokenizer.from_pretrained(str(gemma3_path()))


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """The first paragraphs of five held-out articles: short real documents."""
    articles = split_articles(load_articles("enwiki"), "test")[:5]
    return [article.text[:1500].strip() for article in articles]


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """``datasets`` with its cache under the test's folder; the module."""
    datasets = pytest.importorskip("datasets")
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "datasets" / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", cache / "datasets" / "downloads" / "extracted")
    return datasets
