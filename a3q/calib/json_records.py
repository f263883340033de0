"""A ``.jsonl`` or ``.json`` file's records, parsed one at a time, so that a file of any size is never held whole.

A ``.jsonl`` file is read a line at a time (:func:`a3q.calib.readers.lines`); a ``.json`` file's top-level array is
parsed element by element (``json.JSONDecoder.raw_decode`` over a sliding buffer), reading more only when an element
is cut by the end of the buffer. Each record comes with its place (``line 3``, ``record 3``), and every error names
the file and that place.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from a3q.calib import readers  # its sizes are read through the module, so one setting (or a test's) rules all
from a3q.calib.readers import Progress, Utf8Decoder, lines, open_file, read_bytes, too_big
from a3q.calib.sources import TextSourceError, one_line

_JSON_NON_SPACE = re.compile(r"[^ \t\r\n]")


def jsonl_records(file: Path, where: str, progress: Progress | None) -> Iterator[tuple[str, Any]]:
    """``(place, record)`` for every non-blank line of a ``.jsonl`` file."""
    for number, start, line in lines(file, where, progress):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TextSourceError(f"{where}: line {number}: not UTF-8 text (byte {start + exc.start:,})") from None
        if text.strip():
            yield f"line {number}", _parse_json(text, where, f"line {number}")


def _parse_json(text: str, where: str, place: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TextSourceError(f"{where}: {place}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    except RecursionError:
        raise _too_deep(where, place) from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise TextSourceError(f"{where}: {place}: not valid JSON ({one_line(exc)})") from None


def _too_deep(where: str, place: str) -> TextSourceError:
    return TextSourceError(f"{where}: {place} is nested too deeply to read (JSON arrays/objects inside each other "
                           "beyond Python's recursion limit)")


class _JsonArrayReader:
    """The elements of a top-level JSON array in a file, parsed one at a time from a sliding text buffer."""

    def __init__(self, handle, file: Path, where: str, progress: Progress | None) -> None:
        self.handle, self.file, self.where, self.progress = handle, file, where, progress
        self.utf8 = Utf8Decoder(where)
        self.buffer, self.pos, self.eof = "", 0, False
        self.lines_before = 0  # newlines in the text dropped from the buffer

    def more(self, size: int | None = None) -> bool:
        """Reads ``size`` more bytes (:data:`~a3q.calib.readers.READ_BYTES` by default; fewer at the end) into the
        buffer, dropping what was parsed; False at the end of the file."""
        if self.eof:
            return False
        data = read_bytes(self.handle, size or readers.READ_BYTES, self.where, self.file)
        text = self.utf8.decode(data)
        if self.progress is not None and data:
            self.progress(len(data))
        self.eof = not data
        self.lines_before += self.buffer.count("\n", 0, self.pos)
        self.buffer = self.buffer[self.pos:] + text
        self.pos = 0
        return True

    def skip_space(self) -> str:
        """The next character that is not JSON whitespace ('' at the end of the file), left unread."""
        while True:
            found = _JSON_NON_SPACE.search(self.buffer, self.pos)
            self.pos = found.start() if found else len(self.buffer)
            if found or not self.more():
                return self.buffer[self.pos:self.pos + 1]

    def line(self, pos: int) -> int:
        return self.lines_before + self.buffer.count("\n", 0, pos) + 1

    def invalid(self, message: str, pos: int, place: str | None = None) -> TextSourceError:
        at = f"{place}: " if place else ""
        return TextSourceError(f"{self.where}: {at}not valid JSON ({message}, line {self.line(pos):,})")

    def value(self, place: str) -> Any:
        """Parses the value at the current position, reading more as needed, up to
        :data:`~a3q.calib.readers.MAX_RECORD_BYTES`."""
        decoder = json.JSONDecoder()
        while True:
            try:
                value, end = decoder.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError as exc:
                # a value cut by the end of the buffer fails near that end (or is an unterminated string): read on
                cut = exc.pos >= len(self.buffer) - 8 or exc.msg.startswith("Unterminated string")
                if cut and not self.eof and len(self.buffer) - self.pos <= readers.MAX_RECORD_BYTES:
                    self.more(max(readers.READ_BYTES, len(self.buffer) - self.pos))
                    continue
                if cut and not self.eof:
                    raise too_big(self.where, place, None) from None
                raise self.invalid(exc.msg, exc.pos, place) from None
            except RecursionError:
                raise _too_deep(self.where, place) from None
            except ValueError as exc:  # e.g. an integer with more digits than Python converts
                raise TextSourceError(f"{self.where}: {place}: not valid JSON ({one_line(exc)})") from None
            if end >= len(self.buffer) and not self.eof:  # a number may go on in the next read
                if len(self.buffer) - self.pos > readers.MAX_RECORD_BYTES:
                    raise too_big(self.where, place, None)
                self.more(max(readers.READ_BYTES, len(self.buffer) - self.pos))
                continue
            size = end - self.pos
            if size * 4 > readers.MAX_RECORD_BYTES and not self.buffer.isascii():
                size = len(self.buffer[self.pos:end].encode("utf-8", "surrogatepass"))
            if size > readers.MAX_RECORD_BYTES:
                raise too_big(self.where, place, size)
            self.pos = end
            return value

    def records(self) -> Iterator[tuple[str, Any]]:
        first = self.skip_space()
        if first != "[":
            if not first:
                raise TextSourceError(f"{self.where}: not valid JSON (the file is empty; expected an array of records)")
            kinds = {"{": "an object", '"': "a string", "t": "true/false", "f": "true/false", "n": "null"}
            kind = kinds.get(first, "a number" if first in "-0123456789" else None)
            if kind is None:
                raise self.invalid("Expecting value", self.pos)
            raise TextSourceError(f"{self.where}: expected a JSON array of records, got {kind}")
        self.pos += 1
        index = 0
        if self.skip_space() == "]":
            self.pos += 1
        else:
            while True:
                if not self.skip_space():
                    raise self.invalid("Expecting value", self.pos, f"record {index}")
                yield f"record {index}", self.value(f"record {index}")
                index += 1
                after = self.skip_space()
                self.pos += 1
                if after == "]":
                    break
                if after != ",":
                    raise self.invalid("Expecting ',' delimiter" if after else "unterminated array", self.pos - 1,
                                       f"after record {index - 1}")
        if self.skip_space():
            raise self.invalid("Extra data after the array", self.pos)


def json_array_records(file: Path, where: str, progress: Progress | None) -> Iterator[tuple[str, Any]]:
    """``(place, record)`` for every element of a ``.json`` file's top-level array, parsed one at a time."""
    with open_file(file, where) as handle:
        yield from _JsonArrayReader(handle, file, where, progress).records()
