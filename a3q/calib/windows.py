"""Token windows cut from a text source: the unit of calibration and evaluation.

How windows are cut, for every kind of source (:mod:`a3q.calib.sources`: the ``enwiki`` corpus, a ``path``, a
``dataset``): the source's documents (articles, files, records; chat records rendered with the chat template) are
joined in order with a blank line (``"\\n\\n"``) between them, and that one text is tokenized once, without special
tokens (no BOS/EOS is added; special tokens written in the text, such as a chat template's, stay special). The
token stream is cut into non-overlapping windows of ``seq_len`` tokens; the ragged tail is dropped. Windows may
therefore span document boundaries. Evaluation takes the first ``max_windows`` in order; calibration draws
``windows`` of them at random with a seeded generator, so a recipe is reproducible and calibration never depends on
evaluation settings. A ``.txt`` file holding a corpus split's text gives exactly that split's windows.

Token streams are memoised in memory per source and tokenizer; a file source's key includes each file's size and
modification time, so an edited file is read again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from a3q.calib.documents import cache_key, source_text, tokenizer_key
from a3q.calib.sources import TextDemand, TextSource, TextSourceError, TextSourceFields


_STREAMS: dict[tuple, torch.Tensor] = {}


def token_stream(tokenizer, source: TextSourceFields) -> torch.Tensor:
    """All tokens of a source as one 1-D tensor, memoised per (source, tokenizer).

    Raises :class:`~a3q.calib.sources.TextSourceError` (a ``ValueError``) naming the source when its text cannot be
    read or is empty."""
    key = (cache_key(source), tokenizer_key(tokenizer))
    if key not in _STREAMS:
        text = source_text(source, tokenizer)
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        _STREAMS[key] = torch.tensor(ids, dtype=torch.long)
    return _STREAMS[key]


def sequential_windows(
    tokenizer, source: TextSourceFields, seq_len: int, max_windows: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows in the source's order, shape ``[n, seq_len]``."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2 (a window needs a token to predict)")
    stream = token_stream(tokenizer, source)
    count = stream.numel() // seq_len
    if count == 0:
        raise TextSourceError(f"{source.describe()} has {stream.numel():,} tokens: fewer than one window of {seq_len}")
    if max_windows is not None:
        count = min(count, max_windows)
    return stream[: count * seq_len].view(count, seq_len)


def random_windows(
    tokenizer, source: TextSourceFields, seq_len: int, windows: int, seed: int
) -> torch.Tensor:
    """``windows`` distinct non-overlapping windows chosen with a seeded permutation."""
    available = sequential_windows(tokenizer, source, seq_len)
    if windows > available.shape[0]:
        tokens = token_stream(tokenizer, source).numel()
        raise TextSourceError(
            f"{source.describe()} has only {available.shape[0]} windows of {seq_len} tokens ({tokens:,} tokens); "
            f"asked for {windows}"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(available.shape[0], generator=generator)[:windows]
    return available[order.sort().values]


def _demand(item: Any) -> TextDemand:
    """A :class:`TextDemand`; a stage written against the old protocol gives ``(where, corpus, split, windows,
    seq_len)``, which still works."""
    if isinstance(item, TextDemand):
        return item
    if len(item) == 5:
        where, corpus, split, windows, seq_len = item
        return TextDemand(where, TextSource(corpus=corpus, split=split), windows, seq_len)
    return TextDemand(*item)


def window_shortfalls(tokenizer, demands: Iterable[TextDemand]) -> list[str]:
    """Problems with the text the demands ask for, each naming the demand's ``where`` and the source: a source that
    cannot be read or has no text, or fewer tokens than ``windows × seq_len`` (with how many there are)."""
    problems, unreadable = [], set()
    for where, source, windows, seq_len in map(_demand, demands):
        try:
            tokens = token_stream(tokenizer, source).numel()
        except TextSourceError as exc:
            if str(exc) not in unreadable:  # one problem per source, however many ask for it
                unreadable.add(str(exc))
                problems.append(f"{where}: {exc}")
            continue
        available = tokens // seq_len
        if windows > available:
            problems.append(
                f"{where}: {source.describe()} has {tokens:,} tokens, i.e. {available} windows of {seq_len}; "
                f"{windows} asked for (lower the windows or seq_len)"
            )
    return problems
