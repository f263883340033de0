"""A source's tokens, streamed a batch of pieces at a time, and what is memoised of them.

Windows need a source's tokens, and a source may be far larger than memory: its text is read
(:mod:`a3q.calib.documents`), cut into pieces (:mod:`a3q.calib.pieces`) and tokenized a batch of pieces at a time,
without special tokens. Token counts are memoised in memory per source and tokenizer (a file source's key includes
each file's size and modification time, so an edited file is read again), and so is the bundled corpus's whole token
stream (3 MB of text, tokenized whole, as it always has been). A pass over more than :data:`PROGRESS_MIN_BYTES` of
files shows a progress bar (bytes) on stderr.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from a3q.calib.documents import iter_text, source_text
from a3q.calib.pieces import spanning_added_tokens, text_pieces
from a3q.calib.sources import TextSourceFields, is_plain_local, local_files, source_files

#: pieces tokenized in one call (the tokenizer may use several threads on them)
BATCH_PIECES = 8
#: a pass over more bytes of files than this shows a progress bar on stderr
PROGRESS_MIN_BYTES = 64 << 20
#: host bytes the tokenizer needs for one batch of pieces: under 10 MiB measured on SmolLM2 and Gemma 3, with margin
TOKENIZER_WORKING_BYTES = 32 << 20

_STREAMS: dict[tuple, torch.Tensor] = {}  # the corpus's token streams
_COUNTS: dict[tuple, tuple[int, bool]] = {}  # (tokens, whether that is all of them) per source and tokenizer


def cache_key(source: TextSourceFields) -> tuple:
    """What a source's tokens depend on besides the tokenizer: its fields, and for files their size and
    modification time (so editing a file invalidates what was cached)."""
    fields = tuple((name, json.dumps(value, sort_keys=True)) for name, value in source.summary().items())
    files: list[Path] = []
    if source.kind == "path":
        files = source_files(source.path)
    elif source.kind == "dataset" and source.data_files is not None:
        files = [Path(name).expanduser() for name in local_files(source.data_files) if is_plain_local(name)]
    stats = []
    for file in files:
        try:
            stat = file.stat()
            stats.append((str(file.resolve()), stat.st_size, stat.st_mtime_ns))
        except OSError:
            stats.append((str(file), None, None))
    return fields + tuple(stats)


def tokenizer_key(tokenizer: Any) -> str:
    """What distinguishes tokenizers for cached counts and streams, including the chat template chat records go
    through."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):
        template = json.dumps(template, sort_keys=True)
    digest = hashlib.sha256(template.encode()).hexdigest()[:12]
    return f"{type(tokenizer).__name__}:{len(tokenizer)}:{tokenizer('a3q')['input_ids']}:{digest}"


def _key(tokenizer, source: TextSourceFields) -> tuple:
    return cache_key(source), tokenizer_key(tokenizer)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                     verbose=False)["input_ids"]


def corpus_stream(tokenizer, source: TextSourceFields) -> torch.Tensor:
    """The corpus split's tokens, tokenized whole (bounded: the corpus is 3 MB) and memoised."""
    key = _key(tokenizer, source)
    if key not in _STREAMS:
        _STREAMS[key] = torch.tensor(_encode(tokenizer, [source_text(source, tokenizer)])[0], dtype=torch.long)
        _COUNTS[key] = (_STREAMS[key].numel(), True)
    return _STREAMS[key]


def source_bytes(source: TextSourceFields) -> int | None:
    """The bytes of a ``path`` source's files (for progress bars); None for other sources or unreadable files."""
    if source.kind != "path":
        return None
    try:
        return sum(file.stat().st_size for file in source_files(source.path))
    except OSError:
        return None


def _progress_bar(source: TextSourceFields, description: str):
    total = source_bytes(source)
    if total is None or total <= PROGRESS_MIN_BYTES:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=f"{description} {source.describe()}", file=sys.stderr,
                leave=False, mininterval=1.0)


def token_pieces(tokenizer, source: TextSourceFields, description: str = "tokenizing") -> Iterator[torch.Tensor]:
    """The source's tokens as consecutive 1-D ``int64`` tensors, read and tokenized incrementally (the corpus:
    its memoised whole stream). Stop iterating to stop reading. ``description`` labels the progress bar."""
    if source.kind == "corpus":
        yield corpus_stream(tokenizer, source)
        return
    bar = _progress_bar(source, description)
    try:
        pieces = text_pieces(iter_text(source, tokenizer, bar.update if bar is not None else None),
                             spanning_added_tokens(tokenizer))
        batch: list[str] = []
        for piece in pieces:
            batch.append(piece)
            if len(batch) == BATCH_PIECES:
                yield from (torch.tensor(ids, dtype=torch.long) for ids in _encode(tokenizer, batch))
                batch = []
        if batch:
            yield from (torch.tensor(ids, dtype=torch.long) for ids in _encode(tokenizer, batch))
    finally:
        if bar is not None:
            bar.close()


def remember_count(tokenizer, source: TextSourceFields, tokens: int) -> None:
    """Memoises that the source has exactly ``tokens`` tokens (a pass that read all of it)."""
    _COUNTS[_key(tokenizer, source)] = (tokens, True)


def count_tokens(tokenizer, source: TextSourceFields, at_least: int | None = None) -> int:
    """How many tokens the source has, by a streamed pass that keeps nothing but the count, memoised per source and
    tokenizer. With ``at_least``, counting may stop once there are that many (the result is then a lower bound,
    at least ``at_least``); a smaller result is always the exact count."""
    key = _key(tokenizer, source)
    known, complete = _COUNTS.get(key, (0, False))
    if complete or (at_least is not None and known >= at_least):
        return known
    total = 0
    for piece in token_pieces(tokenizer, source, "counting tokens in"):
        total += piece.numel()
        if at_least is not None and total >= at_least:
            _COUNTS[key] = (max(total, known), False)
            return total
    _COUNTS[key] = (total, True)
    return total


def token_stream(tokenizer, source: TextSourceFields) -> torch.Tensor:
    """All tokens of a source as one 1-D tensor. It holds the whole stream in memory, so it is for small sources
    (the corpus's is memoised); windows are cut without it (:func:`a3q.calib.windows.sequential_windows`,
    :func:`a3q.calib.windows.random_windows`).

    Raises :class:`~a3q.calib.sources.TextSourceError` (a ``ValueError``) naming the source when its text cannot be
    read or is empty."""
    if source.kind == "corpus":
        return corpus_stream(tokenizer, source)
    stream = torch.cat(list(token_pieces(tokenizer, source)))
    remember_count(tokenizer, source, stream.numel())
    return stream
