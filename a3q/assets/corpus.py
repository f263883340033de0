"""Real text, offline: two corpora that ship inside gensim's wheel (its test data).

Corpus ``enwiki``: ``gensim==4.4.0`` includes
``test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``.
We drop ``#REDIRECT`` pages, clean the markup with gensim's ``filter_wiki``, remove the
bold/italic quote runs (``'''``, ``''``) it leaves, and collapse runs of blank lines.
That leaves 106 articles (~3.1M characters). It is the text a3q calibrates, trains and evaluates on.

Corpus ``news``: ``test/test_data/lee_background.cor``, the Lee background corpus (Lee, Pincombe & Welsh, 2005):
300 news stories of the Australian Broadcasting Corporation from 2001–2002, one per line, plain prose (~360k
characters, ~76k SmolLM2 tokens). Another domain than Wikipedia, which no stage and no default calibrates on: the
"text nobody tuned for" that defaults and healing are checked on (``split: all``).

Split (by article, so no text is in both): articles keep the file's order; article ``i`` is in
``test`` when ``i % 5 == 4`` and in ``calib`` otherwise (enwiki: 21 test articles, 85 calib articles).
"""

from __future__ import annotations

import bz2
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from a3q.assets.cache import cache_dir
from a3q.atomic import write_json_atomic

CORPORA = ("enwiki", "news")
SPLITS = ("calib", "test", "all")
TEST_EVERY = 5  # article i is held out when i % TEST_EVERY == TEST_EVERY - 1
_ENWIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_FILE = "lee_background.cor"
_CACHE_VERSION = 1


@dataclass(frozen=True)
class Article:
    """One cleaned article: its title and prose."""

    title: str
    text: str


def _gensim_test_file(corpus: str, name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"corpus '{corpus}' needs gensim==4.4.0 installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / name
    if not path.is_file():
        raise RuntimeError(f"corpus '{corpus}': {path} is missing from the gensim install")
    return path


def _clean(text: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _parse_enwiki() -> list[Article]:
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.open(_gensim_test_file("enwiki", _ENWIKI_FILE)) as handle:
        for title, text, _page_id in extract_pages(handle):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            cleaned = _clean(text)
            if cleaned:
                articles.append(Article(title=title, text=cleaned))
    return articles


def _parse_news() -> list[Article]:
    lines = _gensim_test_file("news", _NEWS_FILE).read_text(encoding="utf-8").splitlines()
    return [Article(title=f"news {index}", text=line.strip()) for index, line in enumerate(lines) if line.strip()]


def load_articles(corpus: str = "enwiki") -> list[Article]:
    """All articles of ``corpus`` in their fixed order, parsed once and cached as JSON."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus '{corpus}' (known: {', '.join(CORPORA)})")
    cached = cache_dir() / "corpora" / f"{corpus}-v{_CACHE_VERSION}.json"
    if cached.is_file():
        rows = json.loads(cached.read_text())
        return [Article(**row) for row in rows]
    articles = _parse_enwiki() if corpus == "enwiki" else _parse_news()
    write_json_atomic(cached, [{"title": a.title, "text": a.text} for a in articles])
    return articles


def split_articles(articles: list[Article], split: str) -> list[Article]:
    """The documented split: every ``TEST_EVERY``-th article is ``test``, the rest ``calib``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (known: {', '.join(SPLITS)})")
    if split == "all":
        return list(articles)
    held_out = split == "test"
    return [a for i, a in enumerate(articles) if (i % TEST_EVERY == TEST_EVERY - 1) == held_out]


def corpus_text(corpus: str, split: str) -> str:
    """The split's articles joined by blank lines: the text that windows are cut from."""
    return "\n\n".join(a.text for a in split_articles(load_articles(corpus), split))


def text_fingerprint(text: str) -> str:
    """Short hash of a text, recorded in reports so results name exactly what they ran on."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
