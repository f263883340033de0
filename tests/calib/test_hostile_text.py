"""Hostile data files: arbitrary bytes, arbitrary JSON records and arbitrary nesting in .jsonl, .json, .txt and
.parquet files give windows, or one :class:`TextSourceError` on one line that names the file (what the CLI prints
before exiting 2); never another exception. Validation refuses with one-line messages naming the file. The real
SmolLM2 tokenizer and its chat template. The files are small (a few KB; nesting up to 100k levels), so memory stays
small by construction; the memory bounds are tests/calib/test_streaming.py's."""

from __future__ import annotations

import io
import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

import a3q.session
from a3q.calib.sources import TextSource, TextSourceError
from a3q.calib.windows import random_windows, sequential_windows
from a3q.cli import app

FAST = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
KINDS = (".jsonl", ".json", ".txt", ".parquet")
_serial = itertools.count()

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
keys = st.sampled_from(["text", "messages", "role", "content", "body"]) | st.text(max_size=6)
values = st.recursive(scalars, lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
                      max_leaves=20)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]) | values,
                                           "content": st.text(max_size=60) | values}), max_size=3)
records = st.one_of(values, st.text(max_size=80), st.fixed_dictionaries({"text": st.text(max_size=300) | values}),
                    st.fixed_dictionaries({"messages": messages | values}))


@st.composite
def nested(draw) -> str:
    """A JSON value nested up to 3,000 levels deep (Python's parser gives up near 1,000)."""
    depth = draw(st.integers(1, 3_000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"text": ', "}"), ('{"a": [', "]}")]))
    return opener * depth + json.dumps(draw(scalars)) + closer * depth


@st.composite
def json_file(draw, kind: str) -> bytes:
    items = [json.dumps(record, ensure_ascii=draw(st.booleans())) for record in draw(st.lists(records, max_size=6))]
    if draw(st.booleans()):
        items.insert(draw(st.integers(0, len(items))), draw(nested()))
    text = "\n".join(items) if kind == ".jsonl" else "[" + ",\n".join(items) + "]"
    return text.encode("utf-8", "surrogatepass")


@st.composite
def parquet_file(draw) -> bytes:
    column = draw(st.sampled_from(["text", "messages", "body"]))
    rows = draw(st.one_of(
        st.lists(st.text(max_size=200) | st.none(), max_size=8),
        st.lists(st.integers(-2**63, 2**63 - 1), max_size=8),
        st.lists(st.lists(st.fixed_dictionaries({"role": st.text(max_size=8), "content": st.text(max_size=60)}),
                          max_size=3), max_size=5),
        st.lists(st.lists(st.text(max_size=10), max_size=3), max_size=5),
    ))
    try:
        table = pa.table({column: pa.array(rows)})
    except (pa.ArrowException, UnicodeEncodeError):  # text arrow will not hold (lone surrogates)
        table = pa.table({column: pa.array([], type=pa.string())})
    out = io.BytesIO()
    pq.write_table(table, out, row_group_size=draw(st.integers(1, 4)))
    return out.getvalue()


@st.composite
def mutated(draw, content: st.SearchStrategy[bytes]) -> bytes:
    """A file's bytes, as is, truncated, with a byte changed, or with bytes inserted."""
    data = draw(content)
    how = draw(st.sampled_from(["as is", "as is", "truncate", "change", "insert"]))
    if how == "as is" or not data:
        return data
    at = draw(st.integers(0, len(data) - 1))
    if how == "truncate":
        return data[:at]
    if how == "change":
        return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1:]
    return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]


def contents(kind: str) -> st.SearchStrategy[bytes]:
    if kind == ".txt":
        made = st.text(max_size=400).map(lambda text: text.encode("utf-8", "surrogatepass"))
    elif kind == ".parquet":
        made = parquet_file()
    else:
        made = json_file(kind)
    return st.binary(max_size=300) | mutated(made)


@FAST
@given(data=st.data())
def test_any_data_file_gives_windows_or_one_text_source_error(tmp_path, tokenizer, data):
    kind = data.draw(st.sampled_from(KINDS))
    path = tmp_path / f"data{next(_serial)}{kind}"  # a new name each time: cached counts key on size and mtime
    path.write_bytes(data.draw(contents(kind)))
    try:
        source = TextSource(path=str(path))
    except ValidationError as exc:
        event(f"{kind}: refused at validation")
        for error in exc.errors():
            assert "\n" not in error["msg"] and f"'{path}'" in error["msg"], error["msg"]
        return
    for cut in (lambda: sequential_windows(tokenizer, source, 2, 3), lambda: random_windows(tokenizer, source, 2, 2, 0)):
        try:
            windows = cut()
        except TextSourceError as exc:
            event(f"{kind}: {str(exc)[len(str(path)) + 8:].split(' (')[0][:40]}")
            assert "\n" not in str(exc) and str(exc).startswith(f"path '{path}'"), str(exc)
        else:
            event(f"{kind}: windows")
            assert windows.dtype == torch.long and windows.shape[1] == 2 and windows.shape[0] >= 1


def test_the_cli_refuses_a_bad_data_file_in_one_line_with_exit_2_before_the_model_loads(tmp_path, monkeypatch):
    """``a3q run``: a .json nested 100k levels deep (at validation), a later record nested so (when the text is
    read, before the model loads) and ``messages: "a string"``: exit 2, the problem on one line, no traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(a3q.session, "load_graph", lambda *a, **k: pytest.fail("the model was loaded"))
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.json").write_text(deep, encoding="utf-8")
    (tmp_path / "later.json").write_text(f'[{{"text": "fine"}}, {deep}]', encoding="utf-8")
    (tmp_path / "chat.jsonl").write_text('{"text": "fine"}\n{"messages": "a string"}\n', encoding="utf-8")
    for data, message in [("deep.json", "calibration: path: 'deep.json': record 0 is nested too deeply to read"),
                          ("later.json", "path 'later.json': record 1 is nested too deeply to read"),
                          ("chat.jsonl", "path 'chat.jsonl': line 2: 'messages' must be chat messages")]:
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
            "model": "smollm2-135m", "calibration": {"path": data, "windows": 1, "seq_len": 8},
            "stages": [{"stage": "a3", "allocation": "uniform", "ratio": 0.2}]}))
        result = CliRunner().invoke(app, ["run", "recipe.yaml", "--out", f"run-{data}"])
        lines = [line for line in result.output.splitlines() if line.strip()]  # "error: invalid recipe:" + a line
        assert result.exit_code == 2 and len(lines) <= 2 and message in lines[-1], result.output
        assert "Traceback" not in result.output and not (tmp_path / f"run-{data}" / "checkpoint").exists()
