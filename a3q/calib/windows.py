"""Token windows cut from a corpus split: the unit of calibration and evaluation.

The split's text is tokenized once (no special tokens) and cut into non-overlapping windows of
``seq_len`` tokens; the ragged tail is dropped. Evaluation takes the first ``max_windows`` in
order; calibration draws ``windows`` of them at random with a seeded generator, so a recipe is
reproducible and calibration never depends on evaluation settings.
"""

from __future__ import annotations

import torch

from a3q.calib.corpus import corpus_text


_STREAMS: dict[tuple[str, str, str], torch.Tensor] = {}


def token_stream(tokenizer, corpus: str, split: str) -> torch.Tensor:
    """All tokens of a corpus split as one 1-D tensor, memoised per (corpus, split, tokenizer)."""
    key = (corpus, split, f"{type(tokenizer).__name__}:{len(tokenizer)}:{tokenizer('a3q')['input_ids']}")
    if key not in _STREAMS:
        text = corpus_text(corpus, split)
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        _STREAMS[key] = torch.tensor(ids, dtype=torch.long)
    return _STREAMS[key]


def sequential_windows(
    tokenizer, corpus: str, split: str, seq_len: int, max_windows: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows in corpus order, shape ``[n, seq_len]``."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2 (a window needs a token to predict)")
    stream = token_stream(tokenizer, corpus, split)
    count = stream.numel() // seq_len
    if count == 0:
        raise ValueError(f"{corpus}/{split} has {stream.numel()} tokens: fewer than one window of {seq_len}")
    if max_windows is not None:
        count = min(count, max_windows)
    return stream[: count * seq_len].view(count, seq_len)


def random_windows(
    tokenizer, corpus: str, split: str, seq_len: int, windows: int, seed: int
) -> torch.Tensor:
    """``windows`` distinct non-overlapping windows chosen with a seeded permutation."""
    available = sequential_windows(tokenizer, corpus, split, seq_len)
    if windows > available.shape[0]:
        raise ValueError(
            f"{corpus}/{split} has only {available.shape[0]} windows of {seq_len} tokens; asked for {windows}"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(available.shape[0], generator=generator)[:windows]
    return available[order.sort().values]


def window_shortfalls(tokenizer, demands: list[tuple[str, str, str, int, int]]) -> list[str]:
    """For each ``(where, corpus, split, windows, seq_len)`` asking for more windows than the split holds, a problem
    naming ``where`` and how many there are."""
    problems = []
    for where, corpus, split, windows, seq_len in demands:
        tokens = token_stream(tokenizer, corpus, split).numel()
        available = tokens // seq_len
        if windows > available:
            problems.append(
                f"{where}: {corpus}/{split} has {tokens:,} tokens, i.e. {available} windows of {seq_len}; "
                f"{windows} asked for (lower the windows or seq_len)"
            )
    return problems
