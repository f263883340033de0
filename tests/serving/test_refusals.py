"""What the plugin refuses, each in ONE line, before any engine process starts; and its registration.

The refused artifacts are edited copies of a real A³ artifact (hard links, so nothing is copied): an a3q family
the plugin does not serve (re-sealed manifest, so only the family is wrong), a missing shard, a tampered manifest,
a weight file whose bytes changed, and an A³ + GPTQ config. ``LLM(...)`` raises the refusal itself (a RuntimeError,
which vLLM's pydantic config does not wrap), and ``a3q serve`` prints it as one line and exits 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from a3q.io.manifest import MANIFEST_NAME, SEAL_KEY, seal, sha256_file
from a3q.serving.checks import ServeRefusal
from tests.serving.helpers import REPO, make_llm, subprocess_env


def derive(src: Path, dst: Path, config_edit=None, manifest_edit=None, reseal: bool = True, drop=(),
           rewrite: dict | None = None, record=()) -> Path:
    """A copy of artifact ``src`` at ``dst`` (hard links), with edits: ``config_edit(config)``, ``rewrite[file](bytes)``
    (changed after export, unless listed in ``record``: then the manifest records the new file, as an export of it
    would), ``drop`` (files removed). ``reseal`` re-signs the manifest (so only the edit is wrong), else it keeps its
    old seal (a tampered manifest)."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    rewrite = dict(rewrite or {})
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src).as_posix()
        if not path.is_file() or rel in drop or rel in ("config.json", MANIFEST_NAME) or rel in rewrite:
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(path, dst / rel)
    for rel, edit in rewrite.items():
        data = bytearray((src / rel).read_bytes())
        edit(data)
        (dst / rel).write_bytes(data)
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    manifest = json.loads((src / MANIFEST_NAME).read_text())
    for rel in ["config.json", *record]:  # what an export of these files would record
        manifest["files"][rel] = {"bytes": (dst / rel).stat().st_size, "sha256": sha256_file(dst / rel)}
    if manifest_edit:
        manifest_edit(manifest)
    if reseal:
        manifest = seal({k: v for k, v in manifest.items() if k != SEAL_KEY})
    (dst / MANIFEST_NAME).write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="module")
def source(artifacts):
    return artifacts["smollm2-a3-20"]  # sharded: model-0000k-of-0000n.safetensors + index


def refusal(folder: Path) -> str:
    """The one-line refusal ``LLM(folder)`` raises."""
    with pytest.raises(ServeRefusal) as caught:
        make_llm(folder)
    message = str(caught.value)
    assert "\n" not in message and message.strip() == message
    return message


def test_unsupported_family_is_refused_naming_the_supported_ones(source, derived_dir):
    def qwen3(config):
        config.update(model_type="a3q_qwen3", architectures=["A3Qwen3ForCausalLM"])

    message = refusal(derive(source, derived_dir / "qwen3", config_edit=qwen3))
    assert "a3q_qwen3" in message and "a3q_llama" in message and "a3q_gemma3" in message


def test_missing_shard_is_refused(source, derived_dir):
    shards = sorted(p.name for p in source.glob("model-*.safetensors"))
    assert len(shards) >= 2, "the uniform test artifact is exported in shards"
    message = refusal(derive(source, derived_dir / "missing", drop=(shards[1],)))
    assert shards[1] in message and "missing" in message


def test_tampered_manifest_is_refused(source, derived_dir):
    def edit(manifest):
        manifest["recipe"]["stages"][0]["ratio"] = 0.1  # claims a different compression than the weights have

    message = refusal(derive(source, derived_dir / "tampered", manifest_edit=edit, reseal=False))
    assert "a3q.json" in message and "edited after export" in message


def test_changed_weights_are_refused(source, derived_dir):
    shard = sorted(p.name for p in source.glob("model-*.safetensors"))[0]

    def flip(data: bytearray):
        data[-1] ^= 0x01  # one bit of one float: same size, different SHA-256

    message = refusal(derive(source, derived_dir / "flipped", rewrite={shard: flip}))
    assert shard in message and "SHA-256" in message


def test_a3_gptq_is_refused(source, derived_dir):
    def gptq(config):
        config["a3q_gptq"] = {"bits": 4, "group_size": 64, "sym": True, "modules": []}

    message = refusal(derive(source, derived_dir / "gptq", config_edit=gptq))
    assert "GPTQ" in message


def test_a3q_quantized_kv_cache_is_served_with_vllms_cache(source, derived_dir):
    """Not refused: the weights are servable; vLLM keeps its own cache (the plugin warns; docs/serving.md)."""
    from a3q.serving.checks import check_servable, kv_cache_setting

    setting = {"bits": 8, "group_size": 32, "residual": 128, "key_axis": "channel"}

    def kv8(data: bytearray):
        generation = json.loads(bytes(data))
        generation["a3q_kv_cache"] = setting
        data[:] = json.dumps(generation).encode()

    folder = derive(source, derived_dir / "kv8", rewrite={"generation_config.json": kv8},
                    record=["generation_config.json"])
    assert check_servable(folder)["model_type"] == "a3q_llama"
    assert kv_cache_setting(folder) == setting


def test_a3q_serve_prints_one_line_and_exits_1(source, derived_dir):
    folder = derive(source, derived_dir / "missing-cli",
                    drop=(sorted(p.name for p in source.glob("model-*.safetensors"))[0],))
    run = subprocess.run([sys.executable, "-m", "a3q.serving.command", str(folder), "--port", "8123"],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and "missing" in run.stderr, run.stderr


def test_a3q_serve_runs_vllms_openai_server(source):
    from a3q.serving.command import serve

    argv = serve(source, port=8123, exec_=False)
    assert argv[1:] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(source), "--port", "8123"]
    assert Path(argv[0]).parent.parent.name == ".venv-serve" or os.environ.get("A3Q_SERVE_VENV")


def test_registration_is_idempotent(source):
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from a3q.modeling.modeling_a3q_llama import A3LlamaConfig
    from a3q.serving.vllm import ARCHITECTURES, register

    register()
    register()
    assert type(AutoConfig.from_pretrained(source)) is A3LlamaConfig  # installed class: no trust_remote_code
    assert set(ARCHITECTURES) <= set(ModelRegistry.get_supported_archs())
    assert all(arch in MODELS_CONFIG_MAP for arch in ARCHITECTURES)
    from importlib.metadata import entry_points

    assert "a3q" in {e.name for e in entry_points(group="vllm.general_plugins")}
