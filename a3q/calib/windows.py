"""Token windows cut from a text source: the unit of calibration and evaluation.

How windows are cut, for every kind of source (:mod:`a3q.calib.sources`: the ``enwiki`` corpus, a ``path``, a
``dataset``): the source's documents (articles, files, records; chat records rendered with the chat template) are
joined in order with a blank line (``"\\n\\n"``) between them, and that text is tokenized without special tokens
(no BOS/EOS is added; special tokens written in the text, such as a chat template's, stay special). The token
stream is cut into non-overlapping windows of ``seq_len`` tokens; the ragged tail is dropped. Windows may
therefore span document boundaries. Evaluation takes the first ``max_windows`` in order; calibration draws
``windows`` of them at random with a seeded generator (the first ``windows`` of ``torch.randperm`` over all the
windows, in the source's order), so a recipe is reproducible and calibration never depends on evaluation settings.
A ``.txt`` file holding a corpus split's text gives exactly that split's windows.

How the text is read and tokenized, in memory that does not grow with the source's size: documents are read one at a
time (:mod:`a3q.calib.documents`, which caps a record at ``MAX_RECORD_BYTES``), and the joined text is cut into
pieces of at most ``PIECE_CHARS`` characters (:mod:`a3q.calib.pieces`) and tokenized a batch of pieces at a time
(:mod:`a3q.calib.tokens`). A piece ends just before a space that has a letter or digit on each side; failing that
(no such space in the piece: text without spaces), just after a newline that has a non-space character on each side;
failing that, anywhere. For the byte-level BPE tokenizers with a GPT-2/Llama-3 style pre-tokenizer regex (SmolLM2,
Llama 3, Qwen) and for SentencePiece-style BPE that turns spaces into ``▁`` and has no token across a space between
two letters or digits (Gemma 3), the first two kinds of cut give exactly the tokens of the whole text (the tests
check SmolLM2 and Gemma 3 against whole-text tokenization, on the enwiki corpus and on text without spaces); a cut
anywhere may tokenize its few neighbouring characters differently, and so may a newline cut for a tokenizer that
prefixes every input with a space (SentencePiece's ``add_dummy_prefix``, as in Llama 2): one token in 64K
characters, and only in text with no space between two words in that stretch. A cut inside an added token that
contains whitespace (such as ``"<|end of text|>"``) is avoided.

* :func:`sequential_windows` reads only until it has ``max_windows`` windows.
* :func:`random_windows` needs the number of windows to draw from: a counting pass tokenizes the whole source
  keeping only the count (memoised per source and tokenizer, so ``a3q.checks.check_text`` before the model loads and
  the run itself count once), then a second pass keeps only the chosen windows and stops after the last. The
  permutation's first ``windows`` entries are computed without materialising it (a partial Fisher-Yates shuffle with
  the generator's draws, equal to ``torch.randperm``'s; checked in the tests), so memory is the windows, one
  record and one batch of pieces (:func:`text_peak_bytes`).
* The bundled corpus (3 MB) is tokenized whole, once per tokenizer, and its token stream is memoised in memory, as
  it always has been.

Counts are memoised in memory per source and tokenizer; a file source's key includes each file's size and
modification time, so an edited file is read again (:mod:`a3q.calib.tokens`). A pass over more than
``PROGRESS_MIN_BYTES`` of files shows a progress bar (bytes) on stderr.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from a3q.calib.pieces import PIECE_CHARS
from a3q.calib.readers import MAX_RECORD_BYTES, READ_BYTES
from a3q.calib.sources import TextDemand, TextSource, TextSourceError, TextSourceFields, source_files
from a3q.calib.tokens import (BATCH_PIECES, TOKENIZER_WORKING_BYTES, corpus_stream, count_tokens, remember_count,
                              token_pieces)

#: ``torch.randperm`` shuffles differently from this many elements on (see :func:`first_of_permutation`)
_RANDPERM_SMALL_LIMIT = (2**32 - 1) // 20
#: below this many windows the permutation is materialised (at most 8 MiB), above it only its first entries
PERMUTATION_MATERIALISED = 1 << 20


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2 (a window needs a token to predict)")


def _too_few(source: TextSourceFields, tokens: int, seq_len: int) -> TextSourceError:
    return TextSourceError(f"{source.describe()} has {tokens:,} tokens: fewer than one window of {seq_len}")


def sequential_windows(
    tokenizer, source: TextSourceFields, seq_len: int, max_windows: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows in the source's order, shape ``[n, seq_len]``: the first ``max_windows`` (all when
    None). Reads only as much of the source as those windows need."""
    _check_seq_len(seq_len)
    if source.kind == "corpus":
        stream = corpus_stream(tokenizer, source)
    else:
        need = None if max_windows is None else max(max_windows, 1) * seq_len
        kept, total = [], 0
        for piece in token_pieces(tokenizer, source):
            kept.append(piece if need is None else piece[: need - total])
            total += kept[-1].numel()
            if need is not None and total >= need:
                break
        else:
            remember_count(tokenizer, source, total)
        stream = torch.cat(kept) if kept else torch.empty(0, dtype=torch.long)
    count = stream.numel() // seq_len
    if count == 0:
        raise _too_few(source, stream.numel(), seq_len)
    if max_windows is not None:
        count = min(count, max_windows)
    return stream[: count * seq_len].view(count, seq_len)


def partial_permutation(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """The first ``k`` entries of ``torch.randperm(n, generator=generator)`` for ``n`` below 2**32 / 20, in
    O(k) memory: ``randperm``'s Fisher-Yates shuffle (position ``i`` swaps with ``i + random() % (n - i)``), with
    the same draws from the generator (``torch.randint(0, n - i)`` takes one ``random()``), only its first ``k``
    steps, and the swapped positions kept in a dict."""
    moved: dict[int, int] = {}
    first = []
    for i in range(min(k, n)):
        j = i + int(torch.randint(0, n - i, (1,), generator=generator)) if i < n - 1 else i
        first.append(moved.get(j, j))
        moved[j] = moved.get(i, i)
    return torch.tensor(first, dtype=torch.long)


def first_of_permutation(n: int, k: int, seed: int) -> torch.Tensor:
    """``torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]``, without holding all ``n`` entries
    when ``n`` is large (:func:`partial_permutation`)."""
    generator = torch.Generator().manual_seed(seed)
    if n <= PERMUTATION_MATERIALISED or n >= _RANDPERM_SMALL_LIMIT:
        return torch.randperm(n, generator=generator)[:k]
    return partial_permutation(n, k, generator)


def random_windows(
    tokenizer, source: TextSourceFields, seq_len: int, windows: int, seed: int
) -> torch.Tensor:
    """``windows`` distinct non-overlapping windows chosen with a seeded permutation, in the source's order. Counts
    the source's tokens (memoised), then reads it again keeping only the chosen windows."""
    _check_seq_len(seq_len)
    tokens = count_tokens(tokenizer, source)
    available = tokens // seq_len
    if available == 0:
        raise _too_few(source, tokens, seq_len)
    if windows > available:
        raise TextSourceError(
            f"{source.describe()} has only {available} windows of {seq_len} tokens ({tokens:,} tokens); "
            f"asked for {windows}"
        )
    chosen = first_of_permutation(available, windows, seed).sort().values
    if source.kind == "corpus":
        return corpus_stream(tokenizer, source)[: available * seq_len].view(available, seq_len)[chosen]
    starts = (chosen * seq_len).tolist()
    out = torch.empty(len(starts), seq_len, dtype=torch.long)
    done, position = 0, 0  # windows complete; tokens before this piece
    for piece in token_pieces(tokenizer, source, "reading windows from"):
        end = position + piece.numel()
        while done < len(starts) and starts[done] < end:
            first, last = max(starts[done], position), min(starts[done] + seq_len, end)
            out[done, first - starts[done] : last - starts[done]] = piece[first - position : last - position]
            if last < starts[done] + seq_len:
                break  # the window goes on in the next piece
            done += 1
        position = end
        if done == len(starts):
            return out
    raise TextSourceError(f"{source.describe()} changed while it was read: it had {tokens:,} tokens and now has "
                          f"{position:,}")


def text_peak_bytes(tokenizer, source: TextSourceFields, seq_len: int, windows: int | None) -> int:
    """Host bytes that cutting ``windows`` windows of ``seq_len`` tokens from ``source`` needs at its peak (``None``:
    all the windows, as an evaluation without ``max_windows`` takes; that needs the source's token count, which is
    memoised or counted): the windows as ``int64``, the permutation that draws them, one record being read (at most
    ``MAX_RECORD_BYTES``, and no more than its file; a ``.txt`` file: one read chunk) with its decoded, parsed and
    joined copies, and one batch of pieces with the tokenizer's working set. For the corpus: its whole memoised token
    stream and text. Reads text only to count tokens not counted yet (``a3q.checks.check_text``'s counts are reused
    with any tokenizer that tokenizes the same)."""
    if windows is None:
        windows = count_tokens(tokenizer, source) // seq_len
    kept = 8 * windows * seq_len
    drawing = 8 * PERMUTATION_MATERIALISED + 200 * windows  # randperm, or the partial shuffle's dict
    if source.kind == "corpus":
        tokens = count_tokens(tokenizer, source)
        return kept + drawing + 8 * tokens + 24 * tokens + TOKENIZER_WORKING_BYTES  # the stream; ~4 chars/token
    record = MAX_RECORD_BYTES
    if source.kind == "path":  # a record is no larger than its file; a .txt file is read a chunk at a time
        files = source_files(source.path)
        txt = all(file.suffix.lower() == ".txt" for file in files)
        record = min(READ_BYTES if txt else MAX_RECORD_BYTES, max((_size(file) for file in files), default=0))
    # the record's bytes, its decoded text, the parsed record and the joined buffer; a batch of pieces
    return kept + drawing + 4 * record + 8 * PIECE_CHARS * BATCH_PIECES + TOKENIZER_WORKING_BYTES


def _size(file) -> int:
    try:
        return file.stat().st_size
    except OSError:
        return MAX_RECORD_BYTES


def _demand(item: Any) -> TextDemand:
    """A :class:`TextDemand`; a stage written against the old protocol gives ``(where, corpus, split, windows,
    seq_len)``, which still works, and so does a plain ``(where, source, windows, seq_len)``."""
    if isinstance(item, TextDemand):
        return item
    if len(item) == 5 and isinstance(item[1], str):
        where, corpus, split, windows, seq_len = item
        return TextDemand(where, TextSource(corpus=corpus, split=split), windows, seq_len)
    return TextDemand(*item)


def window_shortfalls(tokenizer, demands: Iterable[TextDemand]) -> list[str]:
    """Problems with the text the demands ask for, each naming the demand's ``where`` and the source: a source that
    cannot be read or has no text, or fewer tokens than ``windows × seq_len`` (with how many there are).

    Counts tokens by streaming (:func:`~a3q.calib.tokens.count_tokens`, memoised): a demand for windows in order
    stops counting once it has enough; a demand with ``random=True`` (calibration) counts the whole source, which the
    run then reuses."""
    problems, unreadable = [], set()
    for where, source, windows, seq_len, random in map(_demand, demands):
        try:
            tokens = count_tokens(tokenizer, source, None if random else windows * seq_len)
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
