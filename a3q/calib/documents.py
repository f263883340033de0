"""Reading a text source's documents: files (txt, jsonl, json, parquet), ``datasets`` datasets, chat records.

Validation of the source's fields is :mod:`a3q.calib.sources`; this module reads the text itself, and every error
names the source (:class:`~a3q.calib.sources.TextSourceError`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from a3q.calib.corpus import load_articles, split_articles
from a3q.calib.sources import (DEFAULT_DATASET_SPLIT, DEFAULT_TEXT_FIELD, EXTENSIONS, TextSourceError,
                               TextSourceFields, is_plain_local, local_files, source_files)


def load_documents(source: TextSourceFields, tokenizer: Any = None) -> list[str]:
    """The source's documents in order (empty ones dropped); chat records are rendered with ``tokenizer``'s chat
    template. Raises :class:`TextSourceError` naming the source when it cannot be read or holds no text."""
    label = source.describe()
    if source.kind == "corpus":
        documents = [article.text for article in split_articles(load_articles(source.corpus), source.split)]
    elif source.kind == "path":
        documents = []
        files = source_files(source.path)
        if not files:
            raise TextSourceError(f"{label}: no {', '.join(EXTENSIONS)} file found")
        for file in files:
            where = label if file == Path(source.path).expanduser() else f"{label}: '{file.name}'"
            documents.extend(_file_documents(file, source.text_field, tokenizer, where))
    else:
        documents = _dataset_documents(source, tokenizer, label)
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise TextSourceError(f"{label}: no text (every document is empty)")
    return documents


def source_text(source: TextSourceFields, tokenizer: Any = None) -> str:
    """The text windows are cut from: the source's documents joined by a blank line (``\\n\\n``)."""
    return "\n\n".join(load_documents(source, tokenizer))


def _read_text(file: Path, where: str) -> str:
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise TextSourceError(f"{where}: '{file}' does not exist") from None
    except OSError as exc:
        raise TextSourceError(f"{where}: cannot read '{file}': {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TextSourceError(f"{where}: not UTF-8 text (byte {exc.start:,})") from None


def _file_documents(file: Path, text_field: str | None, tokenizer: Any, where: str) -> list[str]:
    suffix = file.suffix.lower()
    if suffix not in EXTENSIONS:
        raise TextSourceError(f"{where}: unsupported extension '{file.suffix}' (supported: {', '.join(EXTENSIONS)})")
    if suffix == ".txt":
        return [_read_text(file, where)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(file)
        except FileNotFoundError:
            raise TextSourceError(f"{where}: '{file}' does not exist") from None
        except Exception as exc:  # noqa: BLE001
            raise TextSourceError(f"{where}: not a readable parquet file ({exc})") from None
        field = _record_field(table.column_names, text_field, where, "the table")
        return [_document(value, tokenizer, f"{where}: row {i}") for i, value in enumerate(table.column(field).to_pylist())]
    text = _read_text(file, where)
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise TextSourceError(f"{where}: line {number}: not valid JSON ({exc.msg})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TextSourceError(f"{where}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(data, list):
            raise TextSourceError(f"{where}: expected a JSON array of records, got {type(data).__name__}")
        records = [(f"record {i}", item) for i, item in enumerate(data)]
    documents = []
    for place, record in records:
        if isinstance(record, str):
            documents.append(record)
            continue
        if not isinstance(record, dict):
            raise TextSourceError(f"{where}: {place}: expected an object, got {type(record).__name__}")
        field = _record_field(list(record), text_field, where, place)
        documents.append(_document(record[field], tokenizer, f"{where}: {place}"))
    return documents


def _record_field(names: list[str], text_field: str | None, where: str, place: str) -> str:
    """The field a record's document is in: ``text_field``, else ``text``, else chat ``messages``."""
    field = text_field or DEFAULT_TEXT_FIELD
    if field in names:
        return field
    if text_field is None and "messages" in names:
        return "messages"
    raise TextSourceError(f"{where}: {place} has no field '{field}' (fields: {', '.join(names) or 'none'}); "
                          "set text_field, or give chat 'messages'")


def _document(value: Any, tokenizer: Any, where: str) -> str:
    """A record's text: a string as is, a chat (list of ``{role, content}``) through the chat template."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return render_chat(value, tokenizer, where)
    raise TextSourceError(f"{where}: expected text (a string) or chat messages (a list of {{role, content}}), "
                          f"got {type(value).__name__}")


def render_chat(messages: list[dict[str, Any]], tokenizer: Any, where: str) -> str:
    """Chat messages as the model sees them at inference: the tokenizer's chat template, not tokenized."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise TextSourceError(f"{where}: chat messages need a tokenizer with a chat template, and this one has none")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # noqa: BLE001 (jinja errors of the template)
        raise TextSourceError(f"{where}: the chat template failed on these messages: {exc}") from None


def _dataset_documents(source: TextSourceFields, tokenizer: Any, label: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise TextSourceError(f"{label}: needs the 'datasets' package (pip install datasets==5.2.0)") from None
    split = source.dataset_split or DEFAULT_DATASET_SPLIT
    try:
        data = datasets.load_dataset(source.dataset, source.dataset_config, split=split, data_files=source.data_files)
    except Exception as exc:  # noqa: BLE001 (datasets raises many kinds: missing, offline, bad files)
        raise TextSourceError(f"{label}: could not be loaded: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, datasets.Dataset):
        raise TextSourceError(f"{label}: expected one split, got {type(data).__name__}")
    field = _record_field(list(data.column_names), source.text_field, label, "the dataset")
    return [_document(value, tokenizer, f"{label}: row {i}") for i, value in enumerate(data[field])]


def cache_key(source: TextSourceFields) -> tuple:
    """What a source's token stream depends on besides the tokenizer: its fields, and for files their size and
    modification time (so editing a file invalidates the cached stream)."""
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
    """What distinguishes tokenizers for cached streams, including the chat template chat records go through."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):
        template = json.dumps(template, sort_keys=True)
    digest = hashlib.sha256(template.encode()).hexdigest()[:12]
    return f"{type(tokenizer).__name__}:{len(tokenizer)}:{tokenizer('a3q')['input_ids']}:{digest}"
