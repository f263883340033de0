"""Text cut into pieces the tokenizer can take one at a time and still give the tokens of the whole text.

A source's text has no size limit, and a tokenizer holds all of what it is given, so the text goes to it in pieces
of at most :data:`PIECE_CHARS` characters, cut only where tokenization does not change. Where a piece is cut, and
for which tokenizers that is exact, is in :mod:`a3q.calib.windows`'s docs; streaming the pieces' tokens is
:mod:`a3q.calib.tokens`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

#: the most characters the tokenizer is given at once as one text
PIECE_CHARS = 1 << 16


def spanning_added_tokens(tokenizer) -> tuple[str, ...]:
    """Added tokens (special or not) that hold whitespace between other characters: a cut must not split one."""
    try:
        added = list(tokenizer.get_added_vocab())
    except Exception:  # noqa: BLE001 (a tokenizer without added tokens)
        return ()
    return tuple(token for token in added if token.strip() and any(c.isspace() for c in token.strip()))


def cut_point(text: str, start: int, end: int, avoid: tuple[str, ...] = ()) -> int:
    """Where to end the piece ``text[start:cut]`` (``start < cut <= end < len(text)``): just before a space with a
    letter or digit on each side, else just after a newline with a non-space character on each side, else at
    ``end``; never inside an occurrence of one of the ``avoid`` strings."""

    def splits(cut: int) -> bool:
        return any(0 <= text.find(token, max(start, cut - len(token) + 1), cut + len(token) - 1) < cut
                   for token in avoid)

    at = end
    while (at := text.rfind(" ", start + 1, at)) > 0:
        if text[at - 1].isalnum() and text[at + 1].isalnum() and not splits(at):
            return at
    at = end
    while (at := text.rfind("\n", start + 1, at)) > 0:
        if not text[at - 1].isspace() and not text[at + 1].isspace() and not splits(at + 1):
            return at + 1
    return end


def text_pieces(parts: Iterable[str], avoid: tuple[str, ...] = ()) -> Iterator[str]:
    """The text of ``parts`` (consecutive), re-cut into pieces of about :data:`PIECE_CHARS` characters at
    :func:`cut_point`; tokenizing the pieces one by one gives the tokens of the whole text (see
    :mod:`a3q.calib.windows`'s docs). Where the cuts fall depends on the text only, not on how it came in parts."""
    margin = 1 + max(map(len, avoid), default=0)  # a cut looks this far past the piece
    pending: list[str] = []
    size = 0
    for part in parts:
        pending.append(part)
        size += len(part)
        if size > PIECE_CHARS + margin:
            buffer, start = "".join(pending), 0
            while len(buffer) - start > PIECE_CHARS + margin:
                cut = cut_point(buffer, start, start + PIECE_CHARS, avoid)
                yield buffer[start:cut]
                start = cut
            pending, size = [buffer[start:]], len(buffer) - start
    if size:
        yield "".join(pending)
