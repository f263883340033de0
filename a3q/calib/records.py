"""A record (a ``.jsonl`` line, a ``.json`` array element, a parquet or dataset row) turned into a document.

Kept apart from the readers because every kind of file ends the same way: the record's field is chosen (the text
field, else chat ``messages``), its value is checked by type, and chat messages are checked and rendered through the
tokenizer's chat template; the rules are in :mod:`a3q.calib.documents`'s docs. Every refusal names the record.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, NamedTuple

from a3q.calib.sources import DEFAULT_TEXT_FIELD, TextSourceError, one_line, shown_names

_SURROGATE = re.compile("[\ud800-\udfff]")


class Document(NamedTuple):
    """One document: where it is (``path 'a.jsonl': line 3``) and its text, as one or more consecutive parts (a
    ``.txt`` file comes in chunks, read as the parts are taken). A document with no parts is empty."""

    where: str
    parts: Iterable[str]


def _json_kind(value: Any) -> str:
    """A value's type in JSON's words, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def record_field(names: list[str], text_field: str | None, where: str, place: str) -> str:
    """The field a record's document is in: ``text_field``, else ``text``, else chat ``messages``."""
    field = text_field or DEFAULT_TEXT_FIELD
    if field in names:
        return field
    if text_field is None and "messages" in names:
        return "messages"
    raise TextSourceError(f"{where}: {place} has no field '{field}' (fields: {shown_names(names)}); "
                          "set text_field, or give chat 'messages'")


def record_document(record: Any, text_field: str | None, tokenizer: Any, where: str, file_where: str,
                    place: str) -> Document:
    """A ``.jsonl``/``.json`` record's document: a string as is, an object through its text (or chat) field."""
    if isinstance(record, str):
        return _text_document(record, where)
    if not isinstance(record, dict):
        raise TextSourceError(f"{where}: expected an object (or a string), got {_json_kind(record)}")
    field = record_field(list(record), text_field, file_where, place)
    return field_document(record[field], field, text_field, tokenizer, where)


def _text_document(text: str, where: str) -> Document:
    found = _SURROGATE.search(text)
    if found:
        raise TextSourceError(f"{where}: the text has an unpaired surrogate (\\u{ord(found.group()):04x}) at "
                              f"character {found.start():,}; it is not Unicode text")
    return Document(where, (text,) if text.strip() else ())


def field_document(value: Any, field: str, text_field: str | None, tokenizer: Any, where: str) -> Document:
    """The document in a record's ``field`` (:func:`record_field`): the text field holds a string or chat messages;
    the ``messages`` field (used when there is no text field) holds chat messages only; ``null`` and ``[]`` are
    empty documents."""
    chat_only = field != (text_field or DEFAULT_TEXT_FIELD)
    if value is None or (isinstance(value, list) and not value):
        return Document(where, ())
    if isinstance(value, str) and not chat_only:
        return _text_document(value, where)
    if isinstance(value, list):
        return _text_document(render_chat(check_chat(value, field, where), tokenizer, where), where)
    if chat_only:
        raise TextSourceError(f"{where}: '{field}' must be chat messages (a list of {{role, content}} objects), "
                              f"got {_json_kind(value)}")
    raise TextSourceError(f"{where}: '{field}' must be text (a string) or chat messages (a list of "
                          f"{{role, content}} objects), got {_json_kind(value)}")


def check_chat(messages: list[Any], field: str, where: str) -> list[dict[str, Any]]:
    """``messages`` when it is a chat: a list of objects, each with a string ``role`` and a string ``content``;
    else a :class:`TextSourceError` naming the record and the message at fault."""
    for number, message in enumerate(messages):
        at = f"{where}: '{field}'[{number}]"
        if not isinstance(message, dict):
            raise TextSourceError(f"{at} must be a {{role, content}} object, got {_json_kind(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise TextSourceError(f"{at} has no '{key}' (keys: {shown_names(message)})")
            if not isinstance(message[key], str):
                raise TextSourceError(f"{at}: '{key}' must be a string, got {_json_kind(message[key])}")
            _text_document(message[key], f"{at}: '{key}'")
    return messages


def render_chat(messages: list[dict[str, Any]], tokenizer: Any, where: str) -> str:
    """Chat messages as the model sees them at inference: the tokenizer's chat template, not tokenized."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise TextSourceError(f"{where}: chat messages need a tokenizer with a chat template, and this one has none")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except RecursionError:
        raise TextSourceError(f"{where}: the chat template recursed too deeply on these messages") from None
    except Exception as exc:  # noqa: BLE001 (jinja errors of the template)
        raise TextSourceError(f"{where}: the chat template failed on these messages: {one_line(exc)}") from None
    if not isinstance(text, str):
        raise TextSourceError(f"{where}: the chat template gave {_json_kind(text)}, not text")
    return text
