"""A text source's documents, in order, one at a time, in memory that does not grow with the source's size.

Validation of the source's fields is :mod:`a3q.calib.sources`; this module reads the text itself, and every error
names the source, and where a record is at fault the file and the record's place in it (``path 'data.jsonl': line
3 ...``, ``record 3`` of a ``.json`` array, ``row 3`` of a parquet file or dataset), as a
:class:`~a3q.calib.sources.TextSourceError` (one line; the CLI exits 2 with it).

How each kind of source is read (:func:`iter_documents`; nothing is read whole; the readers and their sizes,
``READ_BYTES`` and ``MAX_RECORD_BYTES``, are :mod:`a3q.calib.readers` and :mod:`a3q.calib.json_records`):

* ``.txt``: streamed in ``READ_BYTES`` chunks and decoded incrementally (UTF-8, an optional BOM is dropped). The
  whole file is one document and has no size limit; the tokenizer sees it in bounded pieces
  (:mod:`a3q.calib.pieces`).
* ``.jsonl``: one line at a time, with a bounded read: a line longer than ``MAX_RECORD_BYTES`` is refused with its
  number and size, without ever being held in memory. Lines are numbered from 1; blank lines are skipped.
* ``.json``: a top-level array parsed element by element (``json.JSONDecoder.raw_decode`` over a sliding buffer),
  never the whole file at once; an element (``record 0``, ``record 1``, ...) larger than ``MAX_RECORD_BYTES`` or
  nested too deeply for the JSON parser is refused by number.
* ``.parquet``: the text column only, in batches (``pyarrow.parquet.ParquetFile.iter_batches``); a value larger than
  ``MAX_RECORD_BYTES`` is refused by row (from 0). pyarrow reads a row group's column chunk at a time, so a file's
  row groups bound that part of the memory.
* ``dataset``: ``datasets.load_dataset`` (which keeps its own Arrow cache on disk), then rows one at a time, the text
  column only. The local line-based ``data_files`` of the ``json``, ``csv`` and ``text`` builders are first scanned
  with the same bounded read, so a line over ``MAX_RECORD_BYTES`` is refused naming the file and line before
  ``datasets`` tries to hold it.

Records are checked by type (:mod:`a3q.calib.records`). A ``.jsonl`` line or ``.json`` element is an object, or a
string (itself a document). Its text field (``text_field``, default ``text``) is a string, or chat messages; when it
has no such field and ``text_field`` is not set, its ``messages`` field must be chat messages: a list of objects each
with a string ``role`` and a string ``content`` (other keys are passed to the template), rendered with the
tokenizer's chat template. Anything else (``messages: "a string"``, a number or an object as the text, a message
without ``content``) is refused naming the record. ``null``, ``[]`` and whitespace are empty documents, which are
skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from a3q.assets.corpus import load_articles, split_articles
from a3q.calib.json_records import json_array_records, jsonl_records
from a3q.calib.readers import ParquetColumns, Progress, check_line_sizes, check_record_size, txt_parts
from a3q.calib.records import Document, field_document, record_document, record_field
from a3q.calib.sources import (DEFAULT_DATASET_SPLIT, EXTENSIONS, TextSourceError, TextSourceFields, is_plain_local,
                               local_files, one_line, source_files)

#: the ``datasets`` builders whose local files are line-based, scanned for oversize lines before loading
_LINE_BUILDERS = ("json", "csv", "text")


def iter_documents(source: TextSourceFields, tokenizer: Any = None, progress: Progress | None = None
                   ) -> Iterator[Document]:
    """The source's documents in order, read lazily (see the module's docs for each kind of source). Raises
    :class:`TextSourceError` naming the source (and the file and record) when something cannot be read; does not
    check that there is any text (:func:`iter_text` does). ``progress`` is called with the bytes read."""
    label = source.describe()
    if source.kind == "corpus":
        for article in split_articles(load_articles(source.corpus), source.split):
            yield Document(f"{label}: '{article.title}'", (article.text,) if article.text.strip() else ())
    elif source.kind == "path":
        files = source_files(source.path)
        if not files:
            raise TextSourceError(f"{label}: no {', '.join(EXTENSIONS)} file found")
        for file in files:
            where = label if file == Path(source.path).expanduser() else f"{label}: '{file.name}'"
            yield from _file_documents(file, source.text_field, tokenizer, where, progress)
    else:
        yield from _dataset_documents(source, tokenizer, label)


def iter_text(source: TextSourceFields, tokenizer: Any = None, progress: Progress | None = None) -> Iterator[str]:
    """The text windows are cut from, in consecutive parts: the non-empty documents joined by a blank line
    (``\\n\\n``). Each part is at most one record or ``READ_BYTES`` of a ``.txt`` file (plus the separator).
    Raises :class:`TextSourceError` at the end when no document had any text."""
    first = True
    for document in iter_documents(source, tokenizer, progress):
        parts = iter(document.parts)
        head = next(parts, None)
        if head is None:
            continue
        if not first:
            yield "\n\n"
        first = False
        yield head
        yield from parts
    if first:
        raise TextSourceError(f"{source.describe()}: no text (every document is empty)")


def load_documents(source: TextSourceFields, tokenizer: Any = None) -> list[str]:
    """Every non-empty document of the source, in order, as strings: reads the whole source into memory, so it is
    for small sources (the run's paths stream with :func:`iter_text`). Chat records are rendered with
    ``tokenizer``'s chat template. Raises :class:`TextSourceError` naming the source when it cannot be read or holds
    no text."""
    documents = [text for text in ("".join(doc.parts) for doc in iter_documents(source, tokenizer)) if text]
    if not documents:
        raise TextSourceError(f"{source.describe()}: no text (every document is empty)")
    return documents


def source_text(source: TextSourceFields, tokenizer: Any = None) -> str:
    """The whole text windows are cut from (the documents joined by ``\\n\\n``), in memory: for small sources."""
    return "".join(iter_text(source, tokenizer))


def _file_documents(file: Path, text_field: str | None, tokenizer: Any, where: str, progress: Progress | None
                    ) -> Iterator[Document]:
    suffix = file.suffix.lower()
    if suffix not in EXTENSIONS:
        raise TextSourceError(f"{where}: unsupported extension '{file.suffix}' (supported: {', '.join(EXTENSIONS)})")
    if suffix == ".txt":
        yield Document(where, txt_parts(file, where, progress))
        return
    if suffix == ".parquet":
        table = ParquetColumns(file, where)
        field = record_field(table.names, text_field, where, "the table")
        for place, value in table.values(field):
            yield field_document(value, field, text_field, tokenizer, f"{where}: {place}")
        return
    records = jsonl_records(file, where, progress) if suffix == ".jsonl" else json_array_records(file, where, progress)
    for place, record in records:
        yield record_document(record, text_field, tokenizer, f"{where}: {place}", where, place)


def _dataset_documents(source: TextSourceFields, tokenizer: Any, label: str) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise TextSourceError(f"{label}: needs the 'datasets' package (pip install datasets==5.2.0)") from None
    if source.dataset in _LINE_BUILDERS and source.data_files is not None:
        for name in local_files(source.data_files):
            if is_plain_local(name) and Path(name).expanduser().is_file():
                check_line_sizes(Path(name).expanduser(), f"{label}: '{name}'")
    split = source.dataset_split or DEFAULT_DATASET_SPLIT
    try:
        data = datasets.load_dataset(source.dataset, source.dataset_config, split=split, data_files=source.data_files)
    except RecursionError:
        raise TextSourceError(f"{label}: could not be loaded: a record is nested too deeply to read") from None
    except Exception as exc:  # noqa: BLE001 (datasets raises many kinds: missing, offline, bad files)
        raise TextSourceError(f"{label}: could not be loaded: {type(exc).__name__}: {one_line(exc)}") from None
    if not isinstance(data, datasets.Dataset):
        raise TextSourceError(f"{label}: expected one split, got {type(data).__name__}")
    field = record_field(list(data.column_names), source.text_field, label, "the dataset")
    for row, record in enumerate(data.select_columns([field])):
        value = record[field]
        check_record_size(value, label, f"row {row}")
        yield field_document(value, field, source.text_field, tokenizer, f"{label}: row {row}")
