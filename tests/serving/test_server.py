"""``a3q serve ARTIFACT --port N`` starts vLLM's OpenAI-compatible server with the plugin, and it answers exactly.

The command (``python -m a3q.serving.command``, what the ``a3q serve`` CLI calls) checks the artifact, then execs
vLLM's API server from this venv; a greedy ``/v1/completions`` request must return transformers' tokens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.serving.helpers import NEW_TOKENS, REPO, reference, subprocess_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, payload: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    folder = artifacts["smollm2-a3-20"]
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = subprocess_env()
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "a3q.serving.command", str(folder), "--port", str(port), "--host", "127.0.0.1",
             "--", "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"],
            cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"a3q serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"a3q serve did not answer in 300 s:\n{log.read_text()[-4000:]}")
                time.sleep(2)
        yield folder, port, log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_openai_completions_match_transformers(server):
    folder, port, log = server
    ref = reference(folder)["results"][0]
    answer = _post(port, "/v1/completions", {
        "model": str(folder), "prompt": ref["prompt_ids"], "max_tokens": NEW_TOKENS, "temperature": 0.0,
        "ignore_eos": True, "return_token_ids": True})
    assert answer["choices"][0]["token_ids"] == ref["ids"]
    text = log.read_text()
    assert "matches its manifest" in text and "zero-padded the attention heads" in text
