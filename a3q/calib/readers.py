"""Reading a source's files in bounded memory, so that no file, however large, is ever held whole.

Every read takes at most :data:`READ_BYTES` (or one record of at most :data:`MAX_RECORD_BYTES`), and every failure
is a :class:`~a3q.calib.sources.TextSourceError` naming the file and the place in it. This module holds what every
reader shares (the record cap, bounded reads, incremental UTF-8 decoding) and the readers of ``.txt`` files, of
lines and of parquet columns; a ``.jsonl`` or ``.json`` file's records are :mod:`a3q.calib.json_records`. A reader
yields text, or records with their place (``line 3``, ``row 3``); what a record means is :mod:`a3q.calib.records`.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from a3q.calib.sources import TextSourceError, one_line

#: the largest record (a ``.jsonl`` line, a ``.json`` array element, a parquet value, a dataset row's text), in
#: bytes of UTF-8; a larger one is refused naming it (a ``.txt`` file is one document and has no such limit)
MAX_RECORD_BYTES = 16 << 20
#: how much of a file is read at a time
READ_BYTES = 1 << 20
#: parquet rows converted to Python at a time (each value is size-checked before conversion)
PARQUET_BATCH_ROWS = 64
_BOM = codecs.BOM_UTF8

#: called with the number of bytes of the source just read (progress bars)
Progress = Callable[[int], None]


def _mib(count: int) -> str:
    return f"{count / (1 << 20):g} MiB"


def too_big(where: str, place: str, size: int | None = None) -> TextSourceError:
    """The error for a record over :data:`MAX_RECORD_BYTES` (``size``: its bytes, when known)."""
    amount = f"is {size:,} bytes, more than" if size is not None else "is more than"
    return TextSourceError(f"{where}: {place} {amount} the {_mib(MAX_RECORD_BYTES)} a record may have")


def check_record_size(value: Any, where: str, place: str) -> None:
    """Refuses a record's value larger than :data:`MAX_RECORD_BYTES` (measured by :func:`_value_size`)."""
    size = _value_size(value)
    if size > MAX_RECORD_BYTES:
        raise too_big(where, place, size)


def _value_size(value: Any) -> int:
    """About how many bytes a record's value takes (its strings in UTF-8, 8 for anything else), for the record
    cap; walks nested lists and objects without recursing, however deep they are."""
    size, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            size += len(item) if item.isascii() else len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        else:
            size += 8
    return size


# -- bounded reads -----------------------------------------------------------------------------------------------


def open_file(file: Path, where: str):
    """``file`` opened for reading bytes; a missing or unreadable file is refused naming it."""
    try:
        return file.open("rb")
    except FileNotFoundError:
        raise TextSourceError(f"{where}: '{file}' does not exist") from None
    except OSError as exc:
        raise TextSourceError(f"{where}: cannot read '{file}': {exc.strerror or exc}") from None


def read_bytes(handle, size: int, where: str, file: Path) -> bytes:
    """At most ``size`` bytes of an open file (``b""`` at its end)."""
    try:
        return handle.read(size)
    except OSError as exc:
        raise TextSourceError(f"{where}: cannot read '{file}': {exc.strerror or exc}") from None


def _read_line(handle, size: int, where: str, file: Path) -> bytes:
    try:
        return handle.readline(size)
    except OSError as exc:
        raise TextSourceError(f"{where}: cannot read '{file}': {exc.strerror or exc}") from None


class Utf8Decoder:
    """Incremental UTF-8 decoding of a file's bytes (a BOM at the start is dropped) that names the bad byte."""

    def __init__(self, where: str) -> None:
        self.where, self.offset, self.started = where, 0, False  # offset: bytes decoded so far
        self.decoder = codecs.getincrementaldecoder("utf-8")()

    def decode(self, data: bytes) -> str:
        """The text of ``data`` (the next bytes; ``b""`` at the end of the file)."""
        pending = len(self.decoder.getstate()[0])
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise TextSourceError(f"{self.where}: not UTF-8 text (byte {self.offset - pending + exc.start:,})") \
                from None
        self.offset += len(data)
        if text and not self.started:
            self.started, text = True, text.removeprefix("\ufeff")
        return text


# -- .txt files ----------------------------------------------------------------------------------------------------


def _decoded_chunks(file: Path, where: str, progress: Progress | None) -> Iterator[str]:
    """A file's text in chunks of about :data:`READ_BYTES`, decoded incrementally."""
    utf8 = Utf8Decoder(where)
    with open_file(file, where) as handle:
        while True:
            data = read_bytes(handle, READ_BYTES, where, file)
            text = utf8.decode(data)
            if progress is not None and data:
                progress(len(data))
            if text:
                yield text
            if not data:
                return


def txt_parts(file: Path, where: str, progress: Progress | None) -> Iterator[str]:
    """A ``.txt`` file's text in chunks; nothing when it holds only whitespace (an empty document). The file is
    first read up to its first chunk with text (usually the first), and then from the start: whether the document is
    empty is known before any of it is passed on, and no run of whitespace is kept in memory."""
    if not any(chunk.strip() for chunk in _decoded_chunks(file, where, None)):
        if progress is not None:
            progress(file.stat().st_size)
        return
    yield from _decoded_chunks(file, where, progress)


# -- lines ---------------------------------------------------------------------------------------------------------


def lines(file: Path, where: str, progress: Progress | None) -> Iterator[tuple[int, int, bytes]]:
    """``(number, byte offset, line)`` for every line of a file (from 1; the BOM of a first line dropped), read
    with a bounded ``readline``: a line over :data:`MAX_RECORD_BYTES` is refused with its number and size, and is
    measured without being held."""
    with open_file(file, where) as handle:
        number, offset = 0, 0
        while True:
            line = _read_line(handle, MAX_RECORD_BYTES + 1, where, file)
            if not line:
                return
            number += 1
            start, offset = offset, offset + len(line)
            if len(line) > MAX_RECORD_BYTES and not line.endswith(b"\n"):
                size = len(line)
                while line and not line.endswith(b"\n"):
                    line = _read_line(handle, READ_BYTES, where, file)
                    size += len(line)
                raise too_big(where, f"line {number}", size - line.endswith(b"\n"))
            if progress is not None:
                progress(len(line))
            if number == 1 and line.startswith(_BOM):
                line, start = line[len(_BOM):], start + len(_BOM)
            yield number, start, line


def check_line_sizes(file: Path, where: str) -> None:
    """Reads a file's lines only to refuse one over :data:`MAX_RECORD_BYTES`, naming the file and line (a
    dataset's local files, before ``datasets`` tries to hold such a line)."""
    for _ in lines(file, where, None):
        pass


# -- parquet files -------------------------------------------------------------------------------------------------


class ParquetColumns:
    """A parquet file read one column at a time, in batches (``pyarrow.parquet.ParquetFile.iter_batches``); opening
    it reads only its schema (:attr:`names`)."""

    def __init__(self, file: Path, where: str) -> None:
        import pyarrow.parquet as pq

        self.where = where
        try:
            self.parquet = pq.ParquetFile(file)
            self.names: list[str] = self.parquet.schema_arrow.names
        except FileNotFoundError:
            raise TextSourceError(f"{where}: '{file}' does not exist") from None
        except Exception as exc:  # noqa: BLE001 (pyarrow raises several kinds)
            raise TextSourceError(f"{where}: not a readable parquet file ({one_line(exc)})") from None

    def values(self, field: str) -> Iterator[tuple[str, Any]]:
        """``(place, value)`` for every row's ``field`` (``row 0``, ``row 1``, ...), each size-checked against
        :data:`MAX_RECORD_BYTES` before it becomes a Python value; binary values are refused."""
        import pyarrow as pa
        import pyarrow.compute as pc

        where = self.where
        batches = self.parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field])
        row = 0
        while True:
            try:
                batch = next(batches, None)
                if batch is None:
                    return
                column = batch.column(0)
                sized = any(check(column.type) for check in (pa.types.is_string, pa.types.is_large_string,
                                                             pa.types.is_binary, pa.types.is_large_binary))
                sizes = pc.binary_length(column).to_pylist() if sized else None
            except Exception as exc:  # noqa: BLE001 (a corrupt page, a bad type)
                raise TextSourceError(f"{where}: row {row} and on: not a readable parquet file ({one_line(exc)})") \
                    from None
            for i in range(len(column)):
                place = f"row {row}"
                if sizes is not None and (sizes[i] or 0) > MAX_RECORD_BYTES:
                    raise too_big(where, place, sizes[i])
                try:
                    value = column[i].as_py()
                except Exception as exc:  # noqa: BLE001 (e.g. bytes that are not UTF-8 in a string column)
                    raise TextSourceError(f"{where}: {place}: unreadable value ({one_line(exc)})") from None
                if isinstance(value, bytes):
                    raise TextSourceError(f"{where}: {place}: '{field}' is binary, not text")
                if sizes is None:
                    check_record_size(value, where, place)
                yield place, value
                row += 1
