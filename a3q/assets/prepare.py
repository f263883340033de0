"""Prepare every offline asset once (``python -m a3q.assets.prepare``): model folder and corpus."""

from __future__ import annotations

from a3q.assets.models import smollm2_path
from a3q.calib.corpus import CORPORA, load_articles


def main() -> None:
    path = smollm2_path()
    print(f"model smollm2-135m: {path}")
    for corpus in CORPORA:
        print(f"corpus {corpus}: {len(load_articles(corpus))} articles")


if __name__ == "__main__":
    main()
