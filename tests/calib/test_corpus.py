"""The enwiki corpus: real text, a deterministic split by article with no article in both halves."""

from __future__ import annotations

from a3q.assets.corpus import TEST_EVERY, corpus_text, load_articles, split_articles, text_fingerprint


def test_corpus_is_the_cleaned_wikipedia_dump():
    articles = load_articles("enwiki")
    assert len(articles) == 106
    total = sum(len(a.text) for a in articles)
    assert 2_900_000 < total < 3_200_000
    assert articles[0].title == "Anarchism"
    assert "political philosophy" in articles[0].text[:300]
    assert not any("'''" in a.text for a in articles)
    assert not any(a.text.lower().startswith("#redirect") for a in articles)


def test_split_is_disjoint_complete_and_documented():
    articles = load_articles("enwiki")
    calib = split_articles(articles, "calib")
    test = split_articles(articles, "test")
    assert {a.title for a in calib}.isdisjoint({a.title for a in test})
    assert len(calib) + len(test) == len(articles)
    assert [a.title for a in test] == [a.title for i, a in enumerate(articles) if i % TEST_EVERY == TEST_EVERY - 1]
    assert len(test) == 21


def test_split_is_deterministic_across_loads(tmp_path, monkeypatch):
    cached = text_fingerprint(corpus_text("enwiki", "test"))
    monkeypatch.setenv("A3Q_CACHE_DIR", str(tmp_path))  # force a fresh parse from the bz2 dump
    assert text_fingerprint(corpus_text("enwiki", "test")) == cached
    assert (tmp_path / "corpora").is_dir()
