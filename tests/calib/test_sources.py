"""Your own text as calibration/evaluation data: files (.txt, .jsonl, .json, .parquet, a folder), a ``datasets``
dataset, chat records through the chat template; every bad input fails naming its source, and what can be checked
cheaply fails at recipe validation. Real enwiki articles, the real SmolLM2 tokenizer; no model is loaded."""

from __future__ import annotations

import copy
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from a3q.assets.corpus import corpus_text
from a3q.calib.sources import TextDemand, TextSource, TextSourceError, enwiki
from a3q.calib.tokens import token_stream
from a3q.calib.windows import random_windows, sequential_windows, window_shortfalls
from a3q.checks import check_text
from a3q.engine import run_recipe
from a3q.recipe import RecipeError, parse_recipe


def _tokens(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


def _chats(docs: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Tell me about {doc.split()[0]}."}, {"role": "assistant", "content": doc}]
            for doc in docs]


def test_txt_of_the_enwiki_test_split_gives_its_windows(tmp_path, tokenizer):
    (tmp_path / "test.txt").write_text(corpus_text("enwiki", "test"), encoding="utf-8")
    own = TextSource(path=str(tmp_path / "test.txt"))
    assert own.describe() == f"path '{tmp_path / 'test.txt'}'"
    assert torch.equal(token_stream(tokenizer, own), token_stream(tokenizer, enwiki("test")))
    assert torch.equal(sequential_windows(tokenizer, own, 512, 8), sequential_windows(tokenizer, enwiki("test"), 512, 8))
    assert torch.equal(random_windows(tokenizer, own, 256, 4, seed=0), random_windows(tokenizer, enwiki("test"), 256, 4, seed=0))


def test_record_files_and_a_folder_give_their_documents_joined_by_blank_lines(tmp_path, tokenizer, docs):
    expected = _tokens(tokenizer, "\n\n".join(docs))
    body = _jsonl(tmp_path / "body.jsonl", [{"title": f"t{i}", "body": doc} for i, doc in enumerate(docs)])
    (tmp_path / "records.json").write_text(json.dumps([{"text": doc} for doc in docs]), encoding="utf-8")
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), tmp_path / "rows.parquet")
    for source in (TextSource(path=body, text_field="body"), TextSource(path=str(tmp_path / "records.json")),
                   TextSource(path=str(tmp_path / "rows.parquet"))):
        assert torch.equal(token_stream(tokenizer, source), expected), source.describe()

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text(docs[0], encoding="utf-8")
    _jsonl(folder / "b.jsonl", [{"text": doc} for doc in docs[1:3]])
    pq.write_table(pa.table({"text": docs[3:]}), folder / "c.parquet")
    (folder / "README.md").write_text("not text data", encoding="utf-8")  # other extensions are ignored
    assert torch.equal(token_stream(tokenizer, TextSource(path=str(folder))), expected)

    # an edited file is read again (the cache key has its size and modification time)
    (folder / "a.txt").write_text(docs[0] + " More.", encoding="utf-8")
    os.utime(folder / "a.txt", ns=(1, 1))
    changed = _tokens(tokenizer, "\n\n".join([docs[0] + " More.", *docs[1:]]))
    assert torch.equal(token_stream(tokenizer, TextSource(path=str(folder))), changed)


def test_chat_records_are_rendered_with_the_chat_template(tmp_path, tokenizer, docs):
    chats = _chats(docs[:3])
    source = TextSource(path=_jsonl(tmp_path / "chat.jsonl", [{"messages": chat} for chat in chats]))
    rendered = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
    stream = token_stream(tokenizer, source)
    assert torch.equal(stream, _tokens(tokenizer, "\n\n".join(rendered)))
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (stream == im_start).sum().item() == 3 * 3  # system (the template's default), user, assistant

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(TextSourceError, match=r"path '.*chat\.jsonl': line 1: chat messages need a tokenizer with a chat template"):
        token_stream(plain, source)


def test_a_datasets_json_builder_over_data_files(tmp_path, datasets_cache, tokenizer, docs):
    cache = tmp_path / "hf"
    files = _jsonl(tmp_path / "body.jsonl", [{"title": f"t{i}", "body": doc} for i, doc in enumerate(docs)])

    source = TextSource(dataset="json", data_files=files, text_field="body")
    assert source.describe() == f"dataset 'json' (split 'train', data_files \"{files}\")"
    assert torch.equal(token_stream(tokenizer, source), _tokens(tokenizer, "\n\n".join(docs)))
    assert (cache / "datasets").is_dir()  # datasets' cache went where the test put it

    wrong = TextSource(dataset="json", data_files=files, text_field="content")
    with pytest.raises(TextSourceError, match=r"dataset 'json' .*: the dataset has no field 'content' \(fields: title, body\)"):
        token_stream(tokenizer, wrong)
    with pytest.raises(ValidationError, match=r"data_files: dataset 'json' reads local files"):
        TextSource(dataset="json")
    with pytest.raises(ValidationError, match=r"data_files: '.*nope\.jsonl' does not exist"):
        TextSource(dataset="json", data_files=[str(tmp_path / "nope.jsonl")])


def test_bad_files_fail_naming_the_source(tmp_path, tokenizer, docs):
    # checked at validation: missing, unsupported, a field that is not there (the message lists those that are)
    with pytest.raises(ValidationError, match=r"path: '.*missing\.jsonl' does not exist"):
        TextSource(path=str(tmp_path / "missing.jsonl"))
    (tmp_path / "data.csv").write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(ValidationError, match=r"path: '.*data\.csv': unsupported extension '\.csv' \(supported: \.txt, \.jsonl, \.json, \.parquet\)"):
        TextSource(path=str(tmp_path / "data.csv"))
    body = _jsonl(tmp_path / "body.jsonl", [{"title": "t", "body": doc} for doc in docs])
    with pytest.raises(ValidationError, match=r"path: '.*body\.jsonl': no field 'text' \(fields: title, body\)"):
        TextSource(path=body)
    pq.write_table(pa.table({"content": docs}), tmp_path / "rows.parquet")
    with pytest.raises(ValidationError, match=r"path: '.*rows\.parquet': no field 'body' \(fields: content\)"):
        TextSource(path=str(tmp_path / "rows.parquet"), text_field="body")
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps({"text": "café"}, ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(ValidationError, match=r"path: '.*latin1\.jsonl': not UTF-8 text \(byte 13\)"):
        TextSource(path=str(tmp_path / "latin1.jsonl"))

    # found when the text is read (check_text does it before the model loads)
    (tmp_path / "latin1.txt").write_bytes(docs[0].encode() + "\n\ncafé".encode("latin-1"))
    with pytest.raises(TextSourceError, match=r"path '.*latin1\.txt': not UTF-8 text \(byte [\d,]+\)"):
        token_stream(tokenizer, TextSource(path=str(tmp_path / "latin1.txt")))
    (tmp_path / "blank.txt").write_text(" \n\n \n", encoding="utf-8")
    with pytest.raises(TextSourceError, match=r"path '.*blank\.txt': no text"):
        token_stream(tokenizer, TextSource(path=str(tmp_path / "blank.txt")))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"text": docs[0]}) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(TextSourceError, match=r"path '.*broken\.jsonl': line 2: not valid JSON"):
        token_stream(tokenizer, TextSource(path=str(broken)))
    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"text": docs[0]}, {"text": docs[1]}, {"body": docs[2]}])
    with pytest.raises(TextSourceError, match=r"path '.*mixed\.jsonl': line 3 has no field 'text' \(fields: body\)"):
        token_stream(tokenizer, TextSource(path=mixed))

    # too little text: how many tokens and windows there are
    small = TextSource(path=str(tmp_path / "body.jsonl"), text_field="body")
    tokens = token_stream(tokenizer, small).numel()
    problems = window_shortfalls(tokenizer, [TextDemand("calibration.windows", small, 100, 512),
                                             TextDemand("x", small, 1, 512)])
    assert problems == [f"calibration.windows: path '{body}' has {tokens:,} tokens, i.e. {tokens // 512} windows of "
                        "512; 100 asked for (lower the windows or seq_len)"]
    with pytest.raises(TextSourceError, match=rf"path '.*body\.jsonl' has only {tokens // 512} windows of 512 tokens"):
        random_windows(tokenizer, small, 512, 100, seed=0)
    assert window_shortfalls(tokenizer, [TextDemand("evaluate", TextSource(path=str(tmp_path / "blank.txt")), 1, 8)]) \
        == [f"evaluate: path '{tmp_path / 'blank.txt'}': no text (every document is empty)"]


def test_exactly_one_source_and_only_its_fields(tmp_path):
    (tmp_path / "a.txt").write_text("Some text.", encoding="utf-8")
    path = str(tmp_path / "a.txt")
    assert TextSource().describe() == "enwiki/calib" and enwiki("test").summary() == {"corpus": "enwiki", "split": "test"}
    for fields, message in [
        ({"corpus": "enwiki", "path": path}, "corpus and path: give exactly one of corpus, path or dataset"),
        ({"path": path, "dataset": "json", "data_files": path}, "path and dataset: give exactly one of"),
        ({"path": path, "split": "test"}, "split: only applies to a corpus source"),
        ({"split": "test", "text_field": "body"}, "text_field: only applies to a path or dataset source"),
        ({"path": path, "dataset_split": "train"}, "dataset_split: only applies to a dataset source"),
        ({"path": path, "text_field": "body"}, "is plain text; text_field only applies to .jsonl, .json and .parquet"),
    ]:
        with pytest.raises(ValidationError, match=message):
            TextSource(**fields)


def test_recipes_name_their_own_text_and_fail_before_the_model_loads(tmp_path, monkeypatch, docs):
    import a3q.session

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(a3q.session, "load_graph", lambda *a, **k: pytest.fail("the model was loaded"))
    _jsonl(tmp_path / "chat.jsonl", [{"messages": chat} for chat in _chats(docs)])
    folder = tmp_path / "held_out"
    folder.mkdir()
    (folder / "one.txt").write_text("\n\n".join(docs), encoding="utf-8")

    recipe = parse_recipe({
        "model": "smollm2-135m",
        "calibration": {"path": "chat.jsonl", "windows": 2, "seq_len": 64, "seed": 0},
        "stages": [{"stage": "evaluate", "path": "held_out", "seq_len": 64, "max_windows": 2}, {"stage": "a3", "allocation": "uniform", "ratio": 0.2}],
    })
    assert recipe.calibration.describe() == "path 'chat.jsonl'" and recipe.calibration.windows == 2
    assert recipe.stages[0].config.source().describe() == "path 'held_out'"
    assert check_text(recipe) == []

    # validation: two sources, a missing file, a corpus split on a file
    with pytest.raises(RecipeError) as caught:
        parse_recipe({
            "model": "smollm2-135m",
            "calibration": {"corpus": "enwiki", "path": "chat.jsonl"},
            "stages": [{"stage": "evaluate", "path": "missing.jsonl"}, {"stage": "evaluate", "path": "held_out", "split": "test"}],
        })
    assert caught.value.problems == [
        "calibration: corpus and path: give exactly one of corpus, path or dataset as the text source",
        "stages[0] (evaluate): path: 'missing.jsonl' does not exist (relative paths resolve against the working directory)",
        "stages[1] (evaluate): split: only applies to a corpus source, not to path 'held_out'",
    ]

    # before the model loads: too few tokens, named with the source and the counts
    recipe = parse_recipe({"model": "smollm2-135m", "calibration": {"path": "chat.jsonl", "windows": 500, "seq_len": 512},
                           "stages": [{"stage": "a3", "allocation": "uniform", "ratio": 0.2}]})
    with pytest.raises(RecipeError, match=r"calibration\.windows: path 'chat\.jsonl' has [\d,]+ tokens, i\.e\. \d windows of 512; 500 asked for"):
        run_recipe(recipe, tmp_path / "run", show_table=False)
    assert json.loads((tmp_path / "run" / "report.json").read_text())["status"] == "failed"
