"""Prepare every offline asset once (``python -m a3q.assets.prepare``): the bundled model folders and the corpus."""

from __future__ import annotations

from a3q.assets.bundled import BUNDLED_MODELS, bundled_model_path
from a3q.assets.corpus import CORPORA, load_articles


def main() -> None:
    for alias in BUNDLED_MODELS:
        print(f"model {alias}: {bundled_model_path(alias)}")
    for corpus in CORPORA:
        print(f"corpus {corpus}: {len(load_articles(corpus))} articles")


if __name__ == "__main__":
    main()
