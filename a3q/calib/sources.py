"""Text sources: where calibration and evaluation text comes from.

A recipe's ``calibration`` block and an ``evaluate`` stage name their text with exactly one of:

* ``corpus: enwiki`` or ``news`` (+ ``split``: ``calib`` | ``test`` | ``all``), a bundled corpus (:mod:`a3q.assets.corpus`);
  the default when none of the three is given;
* ``path: FILE_OR_DIR``: a ``.txt`` file (the whole file is one document), a ``.jsonl`` file (one JSON record
  per line), a ``.json`` file (an array of records) or a ``.parquet`` file (one record per row); a folder means
  every such file directly in it, sorted by name (other files are ignored). ``text_field`` (default ``text``)
  names the records' text field;
* ``dataset: NAME`` (+ ``dataset_config``, ``dataset_split`` (default ``train``), ``data_files``, ``text_field``),
  loaded with ``datasets.load_dataset`` (offline it reads its cache; the local builders ``json``, ``csv``,
  ``parquet``, ``text`` read ``data_files``).

A record is a document through its text field (a string), or, when it has no such field but has ``messages``
(a list of ``{role, content}`` objects with string values), through the tokenizer's chat template
(``tokenizer.apply_chat_template(messages, tokenize=False)``): an instruct model calibrates on what it sees at
inference. Empty documents are skipped; a source without any text is an error. Relative paths resolve against the
working directory.

What can be checked without reading all the text is checked when the config is validated (so a recipe fails before
anything loads): one source only, fields that belong to another kind of source, a path that is missing or has an
unsupported extension, and the text field of each file's first record (and that it is not nested too deeply to
parse). Everything else (non-UTF-8 bytes, bad JSON, a record without the field or of the wrong type, a record over
``MAX_RECORD_BYTES``, no text at all) fails when the text is read, as one line naming the source, the file and the
record (:mod:`a3q.calib.documents`, which reads a source incrementally). The engine reads it before the model loads
(``a3q.checks.check_text``): all of a calibration source (its tokens are counted), and as much of an evaluation
source as its windows need.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from a3q.assets.corpus import CORPORA, SPLITS

#: file kinds a ``path`` source reads, by extension
EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")
#: ``datasets`` builders that read local files and so need ``data_files``
FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
#: fields of a text source, in the order they are written
SOURCE_FIELDS = ("corpus", "split", "path", "dataset", "dataset_config", "dataset_split", "data_files", "text_field")
DEFAULT_TEXT_FIELD = "text"
DEFAULT_DATASET_SPLIT = "train"
#: how much of a ``.json`` file is read at validation to find its first record
_JSON_PEEK_BYTES = 1 << 20

DataFiles = str | list[str] | dict[str, str | list[str]]


class TextSourceError(ValueError):
    """A text source cannot be read, or its text is unusable; the message names the source."""


class TextSourceFields(BaseModel):
    """The text-source fields and their checks, shared by :class:`TextSource`, the recipe's ``calibration`` and the
    ``evaluate`` stage. A subclass sets :attr:`default_split` (the ``enwiki`` split used when no source is named);
    its own ``model_config`` decides strictness."""

    #: the corpus split when neither ``path`` nor ``dataset`` is given and ``split`` is not either
    default_split: ClassVar[str] = "calib"

    corpus: Literal[CORPORA] | None = None  # type: ignore[valid-type]
    split: Literal[SPLITS] | None = None  # type: ignore[valid-type]
    path: str | None = Field(None, min_length=1, max_length=4096)
    dataset: str | None = Field(None, min_length=1, max_length=4096)
    dataset_config: str | None = Field(None, min_length=1, max_length=4096)
    dataset_split: str | None = Field(None, min_length=1, max_length=4096)
    data_files: DataFiles | None = None
    text_field: str | None = Field(None, min_length=1, max_length=4096)

    @model_validator(mode="before")
    @classmethod
    def _default_to_the_corpus(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("path") is None and data.get("dataset") is None:
            data = dict(data)
            if data.get("corpus") is None:
                data["corpus"] = "enwiki"
            if data.get("split") is None:
                data["split"] = cls.default_split
        return data

    @model_validator(mode="after")
    def _one_source(self):  # noqa: ANN202 (pydantic returns the model)
        given = [name for name in ("corpus", "path", "dataset") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"{' and '.join(given)}: give exactly one of corpus, path or dataset as the text source")
        kind = given[0]
        misplaced = {
            "split": kind != "corpus",
            "text_field": kind == "corpus",
            "dataset_config": kind != "dataset",
            "dataset_split": kind != "dataset",
            "data_files": kind != "dataset",
        }
        for name, wrong in misplaced.items():
            if wrong and getattr(self, name) is not None:
                owner = {"split": "corpus", "text_field": "path or dataset"}.get(name, "dataset")
                raise ValueError(f"{name}: only applies to a {owner} source, not to {kind} '{getattr(self, kind)}'")
        if kind == "path":
            problem = _path_problem(self.path, self.text_field)
            if problem:
                raise ValueError(f"path: {problem}")
        if kind == "dataset":
            problem = _dataset_problem(self.dataset, self.data_files)
            if problem:
                raise ValueError(problem)
        return self

    @property
    def kind(self) -> str:
        """``corpus``, ``path`` or ``dataset``."""
        return "path" if self.path is not None else "dataset" if self.dataset is not None else "corpus"

    def source(self) -> TextSource:
        """The text source alone (without a config's other fields): what windows are cut from."""
        return TextSource.model_construct(**{name: getattr(self, name) for name in SOURCE_FIELDS})

    def describe(self) -> str:
        """The source as messages name it: ``enwiki/test``, ``path 'data/chat.jsonl'``, ``dataset 'json' (...)``."""
        if self.kind == "corpus":
            return f"{self.corpus}/{self.split}"
        if self.kind == "path":
            return f"path '{self.path}'"
        details = [f"config '{self.dataset_config}'"] if self.dataset_config else []
        details.append(f"split '{self.dataset_split or DEFAULT_DATASET_SPLIT}'")
        if self.data_files is not None:
            details.append(f"data_files {_short(self.data_files)}")
        return f"dataset '{self.dataset}' ({', '.join(details)})"

    def summary(self) -> dict[str, Any]:
        """The source's fields that are set, for reports (``{"corpus": "enwiki", "split": "test"}``)."""
        return {name: getattr(self, name) for name in SOURCE_FIELDS if getattr(self, name) is not None}


class TextSource(TextSourceFields):
    """One text source, validated (``TextSource(path="notes.jsonl", text_field="body")``); ``TextSource()`` is
    ``enwiki/calib``. Build the bundled corpus's splits with :func:`enwiki`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def enwiki(split: str = "calib") -> TextSource:
    """The bundled corpus's ``split`` as a source."""
    return TextSource(corpus="enwiki", split=split)


class TextDemand(NamedTuple):
    """Windows a recipe will cut from a source: checked by ``a3q.checks.check_text`` before the model loads.
    ``where`` names the asking field (``stages[0] (evaluate): max_windows``). ``random``: the windows are drawn
    from all of the source's (calibration), so its tokens are all counted (and the count is kept for the run);
    otherwise they are the first ones, and counting stops once there are enough."""

    where: str
    source: TextSourceFields
    windows: int
    seq_len: int
    random: bool = False


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def source_files(path: str) -> list[Path]:
    """The files a ``path`` source reads: the file itself, or a folder's files with a known extension, by name."""
    root = Path(path).expanduser()
    if root.is_dir():
        return sorted((p for p in root.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS),
                      key=lambda p: p.name)
    return [root]


def _path_problem(path: str, text_field: str | None) -> str | None:
    """Why a ``path`` source cannot work, from what is cheap to see: existence, extensions, first records."""
    root = Path(path).expanduser()
    try:
        if not root.exists():
            return f"'{path}' does not exist (relative paths resolve against the working directory)"
        if root.is_dir():
            files = source_files(path)
            if not files:
                return f"folder '{path}' holds no {', '.join(EXTENSIONS)} file"
        elif root.is_file():
            if root.suffix.lower() not in EXTENSIONS:
                return f"'{path}': unsupported extension '{root.suffix}' (supported: {', '.join(EXTENSIONS)})"
            if root.suffix.lower() == ".txt" and text_field is not None:
                return f"'{path}' is plain text; text_field only applies to .jsonl, .json and .parquet files"
            files = [root]
        else:
            return f"'{path}' is neither a file nor a folder"
        for file in files:
            problem = _first_record_problem(file, text_field)
            if problem:
                return f"'{file}': {problem}" if file != root else f"'{path}': {problem}"
    except OSError as exc:
        return f"'{path}': {exc.strerror or exc}"
    except ValueError as exc:  # e.g. an embedded NUL byte
        return f"'{path}' is not a usable path ({exc})"
    return None


def _first_record_problem(file: Path, text_field: str | None) -> str | None:
    """Whether a file's first record has the text field (or chat ``messages``); reads only the start of the file."""
    suffix = file.suffix.lower()
    if suffix == ".txt":
        return None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(file).names
        except Exception as exc:  # noqa: BLE001 (pyarrow raises several kinds)
            return f"not a readable parquet file ({one_line(exc)})"
        return _field_problem(names, text_field)
    try:
        place, record = _peek_record(file, suffix)
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text (byte {exc.start:,})"
    except _TooDeep as exc:
        return f"{exc} is nested too deeply to read (JSON arrays/objects inside each other beyond Python's recursion " \
               "limit)"
    if record is None or isinstance(record, str):
        return None  # empty files fail when read; a JSON array of strings has no fields
    if not isinstance(record, dict):
        return f"the first record ({place}) is a {type(record).__name__}, not an object"
    return _field_problem(list(record), text_field)


class _TooDeep(Exception):
    """A record nested too deeply for the JSON parser; the message is its place (``line 1``, ``record 0``)."""


def _parse_first(text: str, place: str, start: int = 0) -> tuple[str, Any]:
    try:
        return place, json.JSONDecoder().raw_decode(text, start)[0]
    except RecursionError:
        raise _TooDeep(place) from None
    except ValueError:  # not JSON (a JSONDecodeError; the reading names it), or an integer too long to convert
        return place, None


def _peek_record(file: Path, suffix: str) -> tuple[str, Any]:
    """``(place, record)``: the first record of a .jsonl or .json file, or ``(place, None)`` when it cannot be seen
    cheaply (errors come on reading). Raises :class:`_TooDeep` for a record nested too deeply to parse."""
    with file.open("rb") as handle:
        head = handle.read(_JSON_PEEK_BYTES)
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if len(head) < _JSON_PEEK_BYTES or exc.start < len(head) - 4:  # not just a character the peek cut short
            raise
        text = head[: exc.start].decode("utf-8-sig")
    if suffix == ".jsonl":
        lines = text.split("\n")
        if len(head) == _JSON_PEEK_BYTES:
            lines = lines[:-1]  # the last line may be cut short
        number, line = next(((n, line) for n, line in enumerate(lines, start=1) if line.strip()), (1, None))
        return _parse_first(line.strip(), f"line {number}") if line is not None else ("line 1", None)
    start = len(text) - len(text.lstrip())
    if not text[start:].startswith("["):
        return "record 0", None
    rest = text[start + 1 :]
    return _parse_first(rest, "record 0", len(rest) - len(rest.lstrip()))


def one_line(error: Any) -> str:
    """An error's text on one line (runs of whitespace, newlines included, become one space)."""
    return " ".join(str(error).split())


def shown_names(names: Any, limit: int = 20) -> str:
    """Field or key names for a message, on one line: escaped where not printable, the first ``limit`` of them."""
    names = list(names)
    shown = [str(name) if str(name).isprintable() else str(name).encode("unicode_escape").decode("ascii")
             for name in names[:limit]]
    more = f", ... ({len(names):,} in all)" if len(names) > limit else ""
    return (", ".join(shown) or "none") + more


def _field_problem(names: list[str], text_field: str | None) -> str | None:
    field = text_field or DEFAULT_TEXT_FIELD
    if field in names or (text_field is None and "messages" in names):
        return None
    return f"no field '{field}' (fields: {shown_names(names)}); set text_field, or give chat 'messages'"


def local_files(data_files: DataFiles) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, list):
        return list(data_files)
    return [name for value in data_files.values() for name in ([value] if isinstance(value, str) else value)]


def is_plain_local(name: str) -> bool:
    return "://" not in name and not any(char in name for char in "*?[")


def _dataset_problem(dataset: str, data_files: DataFiles | None) -> str | None:
    if dataset in FILE_BUILDERS and data_files is None:
        return f"data_files: dataset '{dataset}' reads local files; name them with data_files"
    for name in local_files(data_files) if data_files is not None else []:
        if is_plain_local(name) and not Path(name).expanduser().exists():
            return f"data_files: '{name}' does not exist (relative paths resolve against the working directory)"
    return None
