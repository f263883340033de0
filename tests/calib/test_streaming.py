"""Text is read and tokenized a piece at a time, with the windows of the whole text: streamed tokens equal
whole-text tokenization (SmolLM2 and Gemma 3, real enwiki text), every kind of file gives the windows of a
reference implementation of the documented semantics, calibration draws ``torch.randperm``'s windows without
holding the permutation, counting stops early for windows in order and happens once for calibration, records are
checked by type and size and named when refused, and memory does not grow with the file (peak RSS measured in a
subprocess). No model is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from a3q.calib import pieces, readers, tokens
from a3q.calib import windows as win
from a3q.assets.corpus import corpus_text, load_articles
from a3q.calib.sources import TextDemand, TextSource, TextSourceError, enwiki
from a3q.calib.tokens import count_tokens, token_stream
from a3q.calib.windows import (first_of_permutation, partial_permutation, random_windows, sequential_windows,
                               text_peak_bytes, window_shortfalls)

MIXED = "Zürich — 東京 and naïve café: 🎉 über 99 % of them."  # multi-byte characters for cut reads


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def reference(tokenizer, docs: list[str], seq_len: int, max_windows: int | None = None, windows: int | None = None,
              seed: int = 0) -> torch.Tensor:
    """The documented semantics, computed whole (as a3q did before streaming): the non-empty documents joined by a
    blank line and tokenized at once, tiled into windows; the first ``max_windows``, or ``windows`` of them drawn
    with ``torch.randperm`` and the seed, in order."""
    stream = _ids(tokenizer, "\n\n".join(doc for doc in docs if doc.strip()))
    tiles = stream[: stream.numel() // seq_len * seq_len].view(-1, seq_len)
    if windows is None:
        return tiles[:max_windows]
    order = torch.randperm(tiles.shape[0], generator=torch.Generator().manual_seed(seed))[:windows]
    return tiles[order.sort().values]


@pytest.fixture
def small_reads(monkeypatch):
    """Tiny pieces and reads, so short real text crosses many piece cuts, read chunks and buffer refills."""
    monkeypatch.setattr(pieces, "PIECE_CHARS", 499)
    monkeypatch.setattr(readers, "READ_BYTES", 331)


def test_streamed_tokens_equal_whole_text_tokenization(tmp_path, monkeypatch, tokenizer, gemma_tokenizer):
    # the corpus keeps whole-text tokenization (the pinned results stand on it)
    assert torch.equal(token_stream(tokenizer, enwiki("test")), _ids(tokenizer, corpus_text("enwiki", "test")))
    text = corpus_text("enwiki", "test") + "\n\n" + " ".join([MIXED] * 200)
    spaceless = "\n".join(text[:60_000].split())  # no space to cut at: the newline cuts
    (tmp_path / "split.txt").write_text(text, encoding="utf-8")
    (tmp_path / "lines.txt").write_text(spaceless, encoding="utf-8")
    monkeypatch.setattr(pieces, "PIECE_CHARS", 997)  # ~560 cuts in the split, ~60 in the lines
    monkeypatch.setattr(readers, "READ_BYTES", 4093)
    for tok in (tokenizer, gemma_tokenizer):
        for name, whole in (("split.txt", text), ("lines.txt", spaceless)):
            streamed = torch.cat(list(tokens.token_pieces(tok, TextSource(path=str(tmp_path / name)))))
            assert torch.equal(streamed, _ids(tok, whole)), (type(tok).__name__, name)


def test_cut_points_follow_the_documented_rule():
    text = "alpha beta,  gamma\ndelta\n\nepsilon-zeta"
    assert pieces.cut_point(text, 0, 30) == text.index(" beta")  # the last space between two letters or digits
    assert pieces.cut_point("a, b.\nc d", 0, 7) == 6  # a newline with non-space around it, cut after it
    assert pieces.cut_point("x" * 50, 0, 20) == 20  # nothing better: anywhere
    avoid = ("<|end of text|>",)
    text = "one two <|end of text|>three"
    assert pieces.cut_point(text, 0, 20, avoid) == text.index(" two")  # not inside the added token
    cut = list(pieces.text_pieces(["ab cd " * 40_000, "ef\ngh" * 20_000]))
    assert "".join(cut) == "ab cd " * 40_000 + "ef\ngh" * 20_000
    assert all(len(piece) <= pieces.PIECE_CHARS + 1 for piece in cut[:-1])
    assert list(pieces.text_pieces(["ab cd " * 40_000])) == list(pieces.text_pieces("ab cd " * 40_000))  # parts don't move cuts


def test_every_kind_of_file_gives_the_windows_of_the_whole_text(tmp_path, monkeypatch, tokenizer, docs, small_reads):
    chat = [{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": docs[1]}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    texts = [docs[0], " \n ", MIXED * 3, rendered, "", docs[2], docs[3] + "\n", docs[4]]
    records = [{"text": docs[0]}, {"text": " \n "}, {"text": MIXED * 3}, {"messages": chat}, {"text": None},
               docs[2], {"text": docs[3] + "\n", "id": 7}, {"text": docs[4]}]
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\n\n".join(json.dumps(r, ensure_ascii=False) for r in records).encode())
    (tmp_path / "records.json").write_text(json.dumps(records, indent=2), encoding="utf-8")
    (tmp_path / "one.txt").write_text("\ufeff" + "\n\n".join(t for t in texts if t.strip()), encoding="utf-8")
    rows = [{"text": t} for t in texts if t != rendered]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet", row_group_size=3)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text(docs[0], encoding="utf-8")
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[1:5]), encoding="utf-8")
    (folder / "c.json").write_text(json.dumps(records[5:]), encoding="utf-8")

    cases = [(jsonl, texts), (tmp_path / "records.json", texts), (tmp_path / "one.txt", texts),
             (tmp_path / "rows.parquet", [t for t in texts if t != rendered]), (folder, texts)]
    for path, expected in cases:
        source = TextSource(path=str(path))
        assert torch.equal(token_stream(tokenizer, source), _ids(tokenizer, "\n\n".join(t for t in expected if t.strip())))
        assert torch.equal(sequential_windows(tokenizer, source, 16, 5), reference(tokenizer, expected, 16, 5))
        assert torch.equal(sequential_windows(tokenizer, source, 16), reference(tokenizer, expected, 16))
        assert torch.equal(random_windows(tokenizer, source, 16, 7, seed=3), reference(tokenizer, expected, 16, windows=7, seed=3))
    monkeypatch.setattr(win, "PERMUTATION_MATERIALISED", 0)  # the partial shuffle, not randperm
    assert torch.equal(random_windows(tokenizer, TextSource(path=str(jsonl)), 8, 9, seed=5),
                       reference(tokenizer, texts, 8, windows=9, seed=5))
    assert torch.equal(random_windows(tokenizer, enwiki("test"), 256, 4, seed=0),
                       reference(tokenizer, [corpus_text("enwiki", "test")], 256, windows=4, seed=0))


def test_the_first_entries_of_randperm_without_the_permutation():
    for n, k, seed in [(1, 1, 0), (2, 2, 1), (3, 3, 7), (17, 5, 2), (1000, 1000, 3), (100_003, 40, 11),
                       (3_000_017, 8, 2**40 + 3)]:
        expected = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
        assert torch.equal(partial_permutation(n, k, torch.Generator().manual_seed(seed)), expected), (n, k, seed)
        assert torch.equal(first_of_permutation(n, k, seed), expected)


def test_counting_stops_early_for_windows_in_order_and_happens_once_for_calibration(tmp_path, monkeypatch, tokenizer,
                                                                                   docs, capsys, small_reads):
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs * 4) + "{not json\n", encoding="utf-8")
    source = TextSource(path=str(broken))
    assert window_shortfalls(tokenizer, [TextDemand("evaluate", source, 2, 16)]) == []  # read only as far as needed
    assert window_shortfalls(tokenizer, [TextDemand("calibration.windows", source, 2, 16, random=True)]) == [
        f"calibration.windows: path '{broken}': line 21: not valid JSON (Expecting property name enclosed in double "
        "quotes, column 2)"]

    passes = []
    token_pieces = tokens.token_pieces

    def counted(*args, **kwargs):
        passes.append(args[1])
        return token_pieces(*args, **kwargs)

    monkeypatch.setattr(tokens, "token_pieces", counted)  # the counting pass
    monkeypatch.setattr(win, "token_pieces", counted)  # the pass that keeps the chosen windows
    monkeypatch.setattr(tokens, "PROGRESS_MIN_BYTES", 0)
    (tmp_path / "good.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    good = TextSource(path=str(tmp_path / "good.jsonl"))
    assert window_shortfalls(tokenizer, [TextDemand("calibration.windows", good, 4, 64, random=True),
                                         TextDemand("stages[0] (evaluate): max_windows", good, 2, 64)]) == []
    assert len(passes) == 1 and "counting tokens in path" in capsys.readouterr().err  # a progress bar, on stderr
    total = count_tokens(tokenizer, good)
    assert random_windows(tokenizer, good, 64, 4, seed=0).shape == (4, 64) and len(passes) == 2  # no recount
    assert window_shortfalls(tokenizer, [TextDemand("calibration.windows", good, total, 64, random=True)]) == [
        f"calibration.windows: path '{good.path}' has {total:,} tokens, i.e. {total // 64} windows of 64; "
        f"{total} asked for (lower the windows or seq_len)"]
    assert len(passes) == 2
    # old-protocol demands (where, corpus, split, windows, seq_len) still work
    assert window_shortfalls(tokenizer, [("x", "enwiki", "test", 1, 64)]) == []

    # the memory preflight's share of the text: the windows, one record and the tokenizer's working set
    size = (tmp_path / "good.jsonl").stat().st_size
    assert 4 * 64 * 8 + 4 * size < text_peak_bytes(tokenizer, good, 64, 4) < 4 * 64 * 8 + 4 * size + (64 << 20)
    assert text_peak_bytes(tokenizer, good, 64, None) >= (total // 64) * 64 * 8
    corpus = text_peak_bytes(tokenizer, enwiki("test"), 512, 8)
    assert 8 * token_stream(tokenizer, enwiki("test")).numel() < corpus < 256 << 20


def _write_records(path, records, style: str) -> str:
    if style == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return str(path)


def test_records_are_checked_by_type_and_named(tmp_path, tokenizer, docs):
    good = {"text": docs[0]}
    chat = "'messages' must be chat messages \\(a list of \\{role, content\\} objects\\), got"
    cases = [
        ({"messages": "a string"}, f"{chat} a string"),
        ({"messages": ["hello", "there"]}, r"'messages'\[0\] must be a \{role, content\} object, got a string"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
         r"'messages'\[1\] has no 'content' \(keys: role\)"),
        ({"messages": [{"role": "user", "content": 5}]}, r"'messages'\[0\]: 'content' must be a string, got a number"),
        ({"messages": [{"role": ["user"], "content": "hi"}]}, r"'messages'\[0\]: 'role' must be a string, got a list"),
        ({"messages": {"role": "user", "content": "hi"}}, f"{chat} an object"),
        ({"text": 5}, r"'text' must be text \(a string\) or chat messages .*, got a number"),
        ({"text": {"body": "x"}}, r"'text' must be text \(a string\) or chat messages .*, got an object"),
        ({"text": True}, r"'text' must be text .*, got true/false"),
        ({"text": ["a", "b"]}, r"'text'\[0\] must be a \{role, content\} object, got a string"),
        ({"text": "\ud800 lone"}, r"the text has an unpaired surrogate \(\\ud800\) at character 0"),
        (5, r"expected an object \(or a string\), got a number"),
        ([good], r"expected an object \(or a string\), got a list"),
    ]
    for number, (bad, message) in enumerate(cases):
        jsonl = _write_records(tmp_path / f"bad{number}.jsonl", [good, good, bad], "jsonl")
        with pytest.raises(TextSourceError, match=rf"^path '.*bad{number}\.jsonl': line 3: {message}"):
            token_stream(tokenizer, TextSource(path=jsonl))
        array = _write_records(tmp_path / f"bad{number}.json", [good, bad], "json")
        with pytest.raises(TextSourceError, match=rf"^path '.*bad{number}\.json': record 1: {message}"):
            token_stream(tokenizer, TextSource(path=array))

    pq.write_table(pa.table({"messages": ["a string", "another"]}), tmp_path / "chat.parquet")
    with pytest.raises(TextSourceError, match=rf"^path '.*chat\.parquet': row 0: {chat} a string"):
        token_stream(tokenizer, TextSource(path=str(tmp_path / "chat.parquet")))
    pq.write_table(pa.table({"text": [docs[0], None, "x"], "n": [1, 2, 3]}), tmp_path / "rows.parquet")
    assert token_stream(tokenizer, TextSource(path=str(tmp_path / "rows.parquet"))).numel() > 0  # null: empty
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "numbers.parquet")
    with pytest.raises(TextSourceError, match=r"^path '.*numbers\.parquet': row 0: 'text' must be text"):
        token_stream(tokenizer, TextSource(path=str(tmp_path / "numbers.parquet")))


def test_a_record_over_the_cap_is_refused_naming_the_file_and_place(tmp_path, monkeypatch, tokenizer, docs,
                                                                   datasets_cache):
    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 2000)
    monkeypatch.setattr(readers, "READ_BYTES", 500)
    big = {"text": " ".join(docs)[:5000]}
    size = len(json.dumps(big))
    jsonl = _write_records(tmp_path / "big.jsonl", [{"text": "short"}, big, {"text": "after"}], "jsonl")
    with pytest.raises(TextSourceError, match=rf"^path '.*big\.jsonl': line 2 is {size:,} bytes, more than the "
                                              r"0\.0019\d* MiB a record may have$"):
        token_stream(tokenizer, TextSource(path=jsonl))
    array = _write_records(tmp_path / "big.json", [{"text": "short"}, big], "json")
    with pytest.raises(TextSourceError, match=r"^path '.*big\.json': record 1 is (more than|[\d,]+ bytes, more than)"):
        token_stream(tokenizer, TextSource(path=array))
    pq.write_table(pa.table({"text": ["short", big["text"]]}), tmp_path / "big.parquet")
    with pytest.raises(TextSourceError, match=r"^path '.*big\.parquet': row 1 is [\d,]+ bytes, more than"):
        token_stream(tokenizer, TextSource(path=str(tmp_path / "big.parquet")))
    # a dataset's line-based local files are scanned before datasets holds them
    monkeypatch.setattr(datasets_cache, "load_dataset", lambda *a, **k: pytest.fail("loaded before the scan"))
    with pytest.raises(TextSourceError, match=rf"^dataset 'json' .*: '{jsonl}': line 2 is {size:,} bytes"):
        token_stream(tokenizer, TextSource(dataset="json", data_files=jsonl))
    # a .txt file is one document of any size
    (tmp_path / "big.txt").write_text(big["text"] * 3, encoding="utf-8")
    assert sequential_windows(tokenizer, TextSource(path=str(tmp_path / "big.txt")), 64, 4).shape == (4, 64)


def test_json_nested_100k_levels_deep_is_refused_naming_the_file_and_record(tmp_path, tokenizer):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.json").write_text(deep, encoding="utf-8")
    with pytest.raises(ValidationError, match=r"path: '.*deep\.json': record 0 is nested too deeply to read"):
        TextSource(path=str(tmp_path / "deep.json"))
    unchecked = TextSource.model_construct(path=str(tmp_path / "deep.json"), corpus=None, split=None, text_field=None)
    with pytest.raises(TextSourceError, match=r"^path '.*deep\.json': record 0 is nested too deeply to read"):
        random_windows(tokenizer, unchecked, 16, 1, seed=0)
    (tmp_path / "inside.json").write_text(f'[{{"text": "fine"}}, {{"text": "x", "meta": {deep}}}]', encoding="utf-8")
    with pytest.raises(TextSourceError, match=r"^path '.*inside\.json': record 1 is nested too deeply to read"):
        token_stream(tokenizer, TextSource(path=str(tmp_path / "inside.json")))
    (tmp_path / "inside.jsonl").write_text(f'{{"text": "fine"}}\n{{"text": "x", "meta": {deep}}}\n', encoding="utf-8")
    problems = window_shortfalls(tokenizer, [TextDemand("calibration.windows",
                                                        TextSource(path=str(tmp_path / "inside.jsonl")), 1, 2, True)])
    assert problems == [f"calibration.windows: path '{tmp_path / 'inside.jsonl'}': line 2 is nested too deeply to "
                        "read (JSON arrays/objects inside each other beyond Python's recursion limit)"]
    (tmp_path / "first.jsonl").write_text(f'\n{{"text": {deep}}}\n', encoding="utf-8")
    with pytest.raises(ValidationError, match=r"'.*first\.jsonl': line 2 is nested too deeply"):
        TextSource(path=str(tmp_path / "first.jsonl"))


_CHILD = textwrap.dedent("""
    import json, sys
    import pyarrow.compute, pyarrow.parquet  # libraries are loaded before measuring, not counted as data
    from transformers import AutoTokenizer
    from a3q.calib.sources import TextSource, TextSourceError
    from a3q.calib.tokens import count_tokens
    from a3q.calib.windows import random_windows, text_peak_bytes

    def mib(key):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(key)) / 1024

    def reset_peak():  # Linux: the peak RSS starts again from the current RSS (else it is the process's peak)
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
        except OSError:
            pass
        return mib("VmRSS")

    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    tokenizer("warm up the tokenizer")
    results = {}
    for name, how in zip(sys.argv[2::2], sys.argv[3::2]):
        source = TextSource(path=name)
        start = reset_peak()
        try:
            if how == "random":
                outcome = list(random_windows(tokenizer, source, 64, 2, seed=0).shape)
            else:
                outcome = count_tokens(tokenizer, source)
        except TextSourceError as exc:
            outcome = str(exc)
        results[name] = {"outcome": outcome, "start": start, "peak": mib("VmHWM"),
                         "estimate": text_peak_bytes(tokenizer, source, 64, 2) / 2**20}
    print(json.dumps(results))
""")


def _paragraphs() -> list[str]:
    return [p for article in load_articles("enwiki") for p in article.text.split("\n\n") if len(p) > 200]


def test_memory_does_not_grow_with_the_file(tmp_path, smollm2_path):
    """The peak RSS (VmHWM, in a child process) rises by less than 48 MiB above the RSS before each file while
    cutting 2 windows of 64 tokens from a 1 MB JSONL, from a 40 MB one, and from the same records as a .json array
    and as a parquet table; a 40 MB one-line JSONL is refused naming the file and line without being read into
    memory. Measured: streaming rises by 1-16 MiB (16: the bounded read of the long line). Reading whole, as before,
    rose by 100 MiB for the 1 MB JSONL, 103 MiB more for the 40 MB one (reusing the first's freed memory) and 280
    MiB for the parquet table, so the bound tells the two apart. Each record carries 4 KB of real text besides its
    150-character text field: the files are large and still quick to tokenize."""
    paragraphs = _paragraphs()
    small, big, array, table, line = (tmp_path / name for name in
                                      ("small.jsonl", "big.jsonl", "big.json", "big.parquet", "line.jsonl"))
    with small.open("w", encoding="utf-8") as out:
        for i in range(2_000):
            out.write(json.dumps({"id": i, "text": paragraphs[i % len(paragraphs)][:500]}) + "\n")
    records = [{"id": i, "text": paragraphs[i % len(paragraphs)][:150],
                "meta": (paragraphs[(i + 1) % len(paragraphs)] * 20)[:4096]} for i in range(9_700)]
    with big.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
    with array.open("w", encoding="utf-8") as out:
        out.write("[\n" + ",\n".join(json.dumps(record) for record in records) + "\n]\n")
    pq.write_table(pa.Table.from_pylist(records), table)
    del records
    with line.open("w", encoding="utf-8") as out:
        out.write('{"text": "' + " ".join(paragraphs).replace('"', "'").replace("\\", "/")[:200] * 210_000 + '"}\n')
    assert small.stat().st_size < 1.1e6 and all(f.stat().st_size > 40e6 for f in (big, array, line))

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    try:
        run = subprocess.run([sys.executable, "-c", _CHILD, str(smollm2_path), str(small), "random", str(big),
                              "random", str(array), "count", str(table), "count", str(line), "random"],
                             capture_output=True, text=True, env=env, timeout=600)
    finally:
        sizes = {name: name.stat().st_size for name in (small, big, array, table, line)}
        for name in sizes:
            name.unlink()  # 160 MB that pytest would otherwise keep for three sessions
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    def grown(name) -> float:  # MiB the peak RSS rose while cutting from this file
        return results[str(name)]["peak"] - results[str(name)]["start"]

    assert results[str(small)]["outcome"] == [2, 64] and results[str(big)]["outcome"] == [2, 64]
    assert results[str(array)]["outcome"] > 100_000 and results[str(table)]["outcome"] > 100_000
    assert results[str(line)]["outcome"] == (f"path '{line}': line 1 is {sizes[line] - 1:,} bytes, more than "
                                             "the 16 MiB a record may have")
    for name in (small, big, array, table, line):
        assert grown(name) < 48, f"{name.name}: peak RSS rose {grown(name):.0f} MiB ({results})"
        assert grown(name) <= results[str(name)]["estimate"]  # the memory preflight's share of the text
