"""The lm_eval stage: lm-evaluation-harness 0.4 on the in-memory model, offline, with local tasks built from real
text (enwiki/test), checked against a3q's own perplexity and a brute-force multiple-choice scorer; and an exported
A³ artifact evaluated by the harness's own command line (``--model hf``, ``trust_remote_code=True``)."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from a3q.assets.corpus import load_articles, split_articles
from a3q.engine import run_recipe
from a3q.metrics.perplexity import perplexity
from a3q.recipe import RecipeError, parse_recipe

pytest.importorskip("lm_eval")

CALIBRATION = {"corpus": "enwiki", "split": "calib", "windows": 4, "seq_len": 128, "seed": 0}
ROLLING_DOCS = 4
CHOICE_DOCS = 8


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 <= len(s.strip()) <= 120 and "\n" not in s.strip()]


def write_tasks(folder: Path) -> dict[str, list[dict]]:
    """Two local tasks over JSON files cut from enwiki/test articles.

    * ``enwiki_rolling`` (loglikelihood_rolling): the first paragraphs of the first test articles, ≤ 1000 characters;
    * ``enwiki_next_sentence`` (multiple_choice): a sentence, then its true successor in the article and three
      sentences drawn from other test articles; the model should prefer the successor.
    """
    articles = split_articles(load_articles("enwiki"), "test")
    rolling = []
    for article in articles:
        paragraphs = [p.strip() for p in article.text.split("\n\n") if len(p.strip()) > 400]
        if paragraphs:
            rolling.append({"text": paragraphs[0][:1000]})
        if len(rolling) == ROLLING_DOCS:
            break
    rng = random.Random(0)
    per_article = [_sentences(article.text) for article in articles]
    choice_docs = []
    for index, sentences in enumerate(per_article):
        pairs = [(a, b) for a, b in zip(sentences, sentences[1:])]
        if not pairs:
            continue
        context, answer = pairs[len(pairs) // 2]
        others = [s for j, group in enumerate(per_article) if j != index for s in group]
        choices = [answer, *rng.sample(others, 3)]
        rng.shuffle(choices)
        choice_docs.append({"context": context, "choices": choices, "label": choices.index(answer)})
        if len(choice_docs) == CHOICE_DOCS:
            break
    data = {"rolling": rolling, "choice": choice_docs}
    for name, rows in data.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    cache = folder / "datasets-cache"
    (folder / "enwiki_rolling.yaml").write_text(f"""task: enwiki_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'rolling.jsonl'}
  cache_dir: {cache}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""")
    (folder / "enwiki_next_sentence.yaml").write_text(f"""task: enwiki_next_sentence
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'choice.jsonl'}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return data


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for this module (2 threads thrash on a shared 2-core machine); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_with_tokenizer_auto_map(source: Path, target: Path) -> Path:
    """SmolLM2's folder (files hard-linked, or copied across file systems) whose ``tokenizer_config.json`` names remote
    tokenizer code that is not there, as some Hub models' do: the export must not carry that ``auto_map`` on."""
    target.mkdir()
    for file in source.iterdir():
        try:
            os.link(file, target / file.name)
        except OSError:
            shutil.copyfile(file, target / file.name)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_missing.MissingTokenizer", None]}
    (target / "tokenizer_config.json").unlink()
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, one_thread, smollm2_path):
    """A³ 10% on SmolLM2 (a copy whose tokenizer config names missing remote code), then lm_eval on both local
    tasks, then export (for the command-line check)."""
    tmp_path = tmp_path_factory.mktemp("lm-eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = write_tasks(tasks)
    model = model_with_tokenizer_auto_map(smollm2_path, tmp_path / "smollm2-auto-map")
    recipe = parse_recipe({
        "model": str(model), "calibration": CALIBRATION,
        "stages": [
            {"stage": "a3", "allocation": "uniform", "ratio": 0.1},
            {"stage": "lm_eval", "tasks": ["enwiki_rolling", "enwiki_next_sentence"], "include_path": str(tasks),
             "batch_size": 4},
            {"stage": "export", "path": str(tmp_path / "art")},
        ],
    })
    result = run_recipe(recipe, tmp_path / "run", show_table=False)
    row = next(r for r in result.report.rows if r["stage"] == "lm_eval")
    return tmp_path, data, result.graph, row


def test_rolling_perplexity_agrees_with_a3q_perplexity(evaluated):
    """loglikelihood_rolling predicts every token of a document, the first from the BOS prefix: the same sums as
    a3q's perplexity (evaluate's function, float64 log-softmax) on windows [BOS] + document tokens."""
    _, data, graph, row = evaluated
    metrics = row["lm_eval"]["enwiki_rolling"]
    tokenizer = graph.tokenizer
    nll, tokens, nbytes, words = 0.0, 0, 0, 0
    for doc in data["rolling"]:
        ids = tokenizer(doc["text"], add_special_tokens=False)["input_ids"]
        assert len(ids) < 512  # one harness window per document (max_length is 8192)
        result = perplexity(graph.model, torch.tensor([[tokenizer.bos_token_id, *ids]]), progress=False)
        nll += result.nll_sum
        tokens += result.predicted_tokens
        nbytes += len(doc["text"].encode("utf-8"))
        words += len(re.split(r"\s+", doc["text"]))
    harness_nll = math.log(metrics["byte_perplexity"]) * nbytes
    assert harness_nll == pytest.approx(nll, rel=1e-5)
    assert metrics["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-4)
    assert metrics["bits_per_byte"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-5)
    token_ppl = math.exp(nll / tokens)
    assert 5 < token_ppl < 200, token_ppl  # a working (compressed) model on Wikipedia prose
    assert row["lm_eval_settings"]["n_samples"]["enwiki_rolling"] == ROLLING_DOCS


def _choice_logliks(model, tokenizer, context: str, continuations: list[str]) -> list[float]:
    """Σ log p(continuation tokens | context) for each continuation, tokenised as the harness does (context, then
    context + continuation); one right-padded batch (causal attention: padding after a sequence cannot change it)."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    wholes = [tokenizer(context + c, add_special_tokens=False)["input_ids"] for c in continuations]
    width = max(len(w) for w in wholes) - 1
    batch = torch.tensor([w[:-1] + [0] * (width - len(w) + 1) for w in wholes])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(batch).logits.double(), dim=-1)
    scores = []
    for row, whole in enumerate(wholes):
        targets = torch.tensor(whole[len(context_ids):])
        positions = torch.arange(len(context_ids) - 1, len(whole) - 1)
        scores.append(float(logprobs[row, positions, targets].sum()))
    return scores


def test_multiple_choice_accuracy_equals_a_brute_force_scorer(evaluated):
    _, data, graph, row = evaluated
    metrics = row["lm_eval"]["enwiki_next_sentence"]
    correct, correct_norm = 0, 0
    for doc in data["choice"]:
        scores = _choice_logliks(graph.model, graph.tokenizer, doc["context"], [" " + choice for choice in doc["choices"]])
        correct += max(range(4), key=scores.__getitem__) == doc["label"]
        normed = [score / len(choice) for score, choice in zip(scores, doc["choices"])]
        correct_norm += max(range(4), key=normed.__getitem__) == doc["label"]
    assert metrics["acc"] == pytest.approx(correct / CHOICE_DOCS, abs=1e-12)
    assert metrics["acc_norm"] == pytest.approx(correct_norm / CHOICE_DOCS, abs=1e-12)
    assert 0 < correct + correct_norm  # not a scorer that never matches (the A³ 10% model: 3 of 8 when written)
    assert metrics["acc_stderr"] > 0
    assert "enwiki_next_sentence: acc_norm" in row["note"]


def test_exported_artifact_runs_under_the_lm_eval_command_line(evaluated):
    """``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`` on the A³ artifact, in a fresh
    process without a3q imported: the same log-likelihoods as the stage computed in memory."""
    tmp_path, _, _, row = evaluated
    out = tmp_path / "cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={tmp_path / 'art'},trust_remote_code=True",
               "--tasks", "enwiki_rolling", "--include_path", str(tmp_path / "tasks"),
               "--device", "cpu", "--batch_size", "4", "--output_path", str(out)]
    assert "auto_map" not in json.loads((tmp_path / "art" / "tokenizer_config.json").read_text())
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["enwiki_rolling"]
    for metric in ("byte_perplexity", "word_perplexity", "bits_per_byte"):
        assert results[f"{metric},none"] == pytest.approx(row["lm_eval"]["enwiki_rolling"][metric], rel=1e-5), metric
    assert "A3LlamaForCausalLM" in done.stdout + done.stderr or "a3q_llama" in (tmp_path / "art" / "config.json").read_text()


@pytest.mark.parametrize("stage,message", [
    ({"stage": "lm_eval", "tasks": []}, "stages[0] (lm_eval): tasks: List should have at least 1 item"),
    ({"stage": "lm_eval"}, "stages[0] (lm_eval): tasks: Field required"),
    ({"stage": "lm_eval", "tasks": ["a", "a"]}, "stages[0] (lm_eval): tasks: Value error, each task may appear once"),
    ({"stage": "lm_eval", "tasks": ["a"], "include_path": "/nonexistent/tasks"},
     "stages[0] (lm_eval): include_path: Value error, '/nonexistent/tasks' does not exist"),
    ({"stage": "lm_eval", "tasks": ["a"], "limit": 0}, "stages[0] (lm_eval): limit: Value error, must be positive"),
    ({"stage": "lm_eval", "tasks": ["a"], "limit": 2.5}, "stages[0] (lm_eval): limit: Value error, a fractional limit"),
    ({"stage": "lm_eval", "tasks": ["a"], "batch_size": 0}, "stages[0] (lm_eval): batch_size"),
    ({"stage": "lm_eval", "tasks": ["a"], "num_fewshot": -1}, "stages[0] (lm_eval): num_fewshot"),
    ({"stage": "lm_eval", "tasks": ["a"], "fewshot": 1}, "stages[0] (lm_eval): fewshot: Extra inputs are not permitted"),
])
def test_bad_settings_are_refused_before_loading(stage, message):
    with pytest.raises(RecipeError) as error:
        parse_recipe({"model": "smollm2-135m", "stages": [stage]})
    assert message.replace("Value error, ", "") in str(error.value).replace("Value error, ", "")
