"""Sharded safetensors export (issue 12): ``max_shard_size`` splits the weights into transformers' standard shards +
``model.safetensors.index.json``; the manifest checks every shard by name; every loader reads the shards.

On the real SmolLM2 (538 MB in float32) with ``max_shard_size: 100MB``: six shards (the 113 MB embedding alone in
one). The A³-class artifact is SmolLM2 in a3q's class with the v/o head dims and MLP widths of some layers cut (the
shapes an A³ run produces, without the minute its statistics cost on 2 CPU cores; tests/stages/a3 covers the maths),
and GPTQ-packed attention in layer 0.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import a3q
from a3q.arch.surgery import as_a3_graph, rebuild_layer, redescribe
from a3q.engine import apply_stage
from a3q.io.artifact import save_artifact
from a3q.io.manifest import ArtifactError, verify_artifact
from a3q.io.model_folder import model_folder_problem
from a3q.io.shards import WEIGHTS_INDEX, parse_shard_size
from a3q.recipe import RecipeError, parse_recipe
from tests.remote_code import remote_code_logits

SHARD = "100MB"
IDS = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 2, 4418, 30, 216, 9801]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _shards(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("model-*-of-*.safetensors"))


def _copy(artifact: Path, target: Path, tampered: str | None = None, skip: tuple[str, ...] = ()) -> Path:
    """A copy of ``artifact``: hard links, except ``tampered`` (a real copy) and ``skip`` (left out)."""
    target.mkdir(parents=True)
    for source in artifact.iterdir():
        if source.name in skip:
            continue
        if source.name == tampered:
            shutil.copyfile(source, target / source.name)
        else:
            os.link(source, target / source.name)
    return target


@pytest.fixture(scope="module")
def dense(smollm2, tmp_path_factory) -> Path:
    return save_artifact(smollm2, tmp_path_factory.mktemp("sharded") / "dense", recipe={"model": "smollm2-135m"},
                         report=[], max_shard_size=SHARD)


def test_dense_export_writes_standard_shards_and_reloads_identically(smollm2, dense):
    shards = _shards(dense)
    assert shards == [f"model-{k:05d}-of-00006.safetensors" for k in range(1, 7)]
    assert not (dense / "model.safetensors").exists()
    index = json.loads((dense / WEIGHTS_INDEX).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    stored: dict[str, int] = {}
    for shard in shards:
        with safe_open(str(dense / shard), "pt") as handle:
            keys = list(handle.keys())
            assert all(index["weight_map"][key] == shard for key in keys)
            sizes = {key: handle.get_slice(key).get_shape() for key in keys}
        stored.update({key: torch.Size(shape).numel() * 4 for key, shape in sizes.items()})
        # at most 100 MB per shard, except a tensor bigger than that alone in its own (the embedding)
        assert (dense / shard).stat().st_size <= parse_shard_size(SHARD) + 100_000 or len(keys) == 1
    assert stored.keys() == index["weight_map"].keys()
    assert index["metadata"]["total_size"] == sum(stored.values()) == 538_060_032
    manifest = json.loads((dense / "a3q.json").read_text())
    assert {*shards, WEIGHTS_INDEX} <= manifest["files"].keys()
    assert manifest["weights"] == {"files": shards, "shards": 6, "index": WEIGHTS_INDEX, "max_shard_size": 100_000_000}
    assert model_folder_problem(dense) is None

    reloaded = a3q.load(str(dense))
    assert torch.equal(_logits(reloaded.model), _logits(smollm2.model))


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_a_damaged_shard_is_refused_by_name(dense, tmp_path, damage):
    shard = "model-00003-of-00006.safetensors"
    copy_ = _copy(dense, tmp_path / "art", tampered=shard, skip=(shard,) if damage == "missing" else ())
    size = (dense / shard).stat().st_size
    if damage == "flip":
        with open(copy_ / shard, "r+b") as handle:
            handle.seek(size // 2)
            byte = handle.read(1)
            handle.seek(size // 2)
            handle.write(bytes([byte[0] ^ 0x01]))
    elif damage == "truncate":
        with open(copy_ / shard, "r+b") as handle:
            handle.truncate(size - 4096)
    expected = {"flip": "SHA-256 mismatch", "truncate": "truncated", "missing": "missing"}[damage]
    with pytest.raises(ArtifactError, match=expected) as caught:
        verify_artifact(copy_)
    assert shard in str(caught.value)
    if damage == "flip":  # sizes match: only the hashes, which loading checks, see it
        assert model_folder_problem(copy_) is None
        with pytest.raises(ArtifactError, match=f"{shard}: content differs"):
            a3q.load(str(copy_))
    else:  # recipe validation (sizes) refuses it before any model loads
        assert shard in model_folder_problem(copy_)


def test_a_plain_folder_has_every_shard_checked_against_its_header_and_index(dense, tmp_path):
    """Without a manifest (a sharded Hugging Face folder), the headers and the index are what is checked."""
    plain = _copy(dense, tmp_path / "plain", skip=("a3q.json",))
    assert model_folder_problem(plain) is None
    (plain / "model-00004-of-00006.safetensors").unlink()
    assert "weights file model-00004-of-00006.safetensors is missing" in model_folder_problem(plain)

    truncated = _copy(dense, tmp_path / "truncated", tampered="model-00005-of-00006.safetensors", skip=("a3q.json",))
    with open(truncated / "model-00005-of-00006.safetensors", "r+b") as handle:
        handle.truncate(1_000_000)
    assert "model-00005-of-00006.safetensors is truncated" in model_folder_problem(truncated)

    for edit, message in [
        (lambda m: m["weight_map"].update({"model.norm.weight": "model-00001-of-00006.safetensors"}),
         "places 'model.norm.weight' in model-00001-of-00006.safetensors, which does not hold it"),
        (lambda m: m["weight_map"].update({"model.norm.weight": "../model-00001-of-00006.safetensors"}),
         "which is not a file in this folder"),
        (lambda m: m.pop("weight_map"), "has no weight_map"),
    ]:
        edited = _copy(dense, tmp_path / f"edited-{len(message)}", tampered=WEIGHTS_INDEX, skip=("a3q.json",))
        index = json.loads((edited / WEIGHTS_INDEX).read_text())
        edit(index)
        (edited / WEIGHTS_INDEX).write_text(json.dumps(index))
        assert message in model_folder_problem(edited)


def _a3_class_with_smaller_layers(graph):
    """SmolLM2 in a3q's A³ class with the v/o head dims and MLP widths of every third layer cut (A³'s shapes; no
    statistics)."""
    graph = as_a3_graph(graph)  # copies the weights: the session model is untouched
    model = graph.model
    for index in range(0, 30, 3):
        vo, ff = 64 - 8 * (index % 2 + 1), 1536 - 128 * (index % 4 + 1)
        attention, mlp = model.model.layers[index].self_attn, model.model.layers[index].mlp
        v = attention.v_proj.weight.detach().view(3, 64, 576)[:, :vo].reshape(3 * vo, 576)
        o = attention.o_proj.weight.detach().view(576, 9, 64)[:, :, :vo].reshape(576, 9 * vo)
        weights = {"v.weight": v.clone(), "o.weight": o.clone(), "gate.weight": mlp.gate_proj.weight.detach()[:ff].clone(),
                   "up.weight": mlp.up_proj.weight.detach()[:ff].clone(),
                   "down.weight": mlp.down_proj.weight.detach()[:, :ff].clone()}
        rebuild_layer(model, "llama", index, weights, {"vo_head_dims": vo, "intermediate_sizes": ff})
    return redescribe(graph)


@pytest.mark.usefixtures("one_torch_thread")
def test_a3_gptq_export_through_the_stage_shards_and_loads_with_and_without_a3q(smollm2, tmp_path):
    """The A³ class (saved with its remote code) with GPTQ-packed linears, which a3q loads through its own loader
    (``_load_rebuilt``, one shard at a time) and transformers through the index."""
    from a3q.quant.gptq_linear import GPTQLinear

    graph = _a3_class_with_smaller_layers(smollm2)
    assert graph.model.config.model_type == "a3q_llama" and graph.layers[3].intermediate_size == 1024
    windows = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    skip = ["mlp."] + [f"layers.{digit}" for digit in range(1, 10)]  # the attention of layer 0 only
    graph, _ = apply_stage(graph, "gptq", windows=windows, bits=4, group_size=64, skip_modules=skip)
    path = tmp_path / "a3-gptq"
    _, row = apply_stage(graph, "export", path=str(path), max_shard_size=SHARD)
    shards = _shards(path)
    assert row["shards"] == len(shards) > 1 and row["max_shard_size"] == 100_000_000
    assert (path / "modeling_a3q_llama.py").is_file() and (path / "a3q_gptq_linear.py").is_file()
    assert "model.layers.0.self_attn.q_proj.qweight" in json.loads((path / WEIGHTS_INDEX).read_text())["weight_map"]
    expected = _logits(graph.model)

    reloaded = a3q.load(str(path))
    assert isinstance(reloaded.model.model.layers[0].self_attn.q_proj, GPTQLinear)
    assert reloaded.layers[3].intermediate_size == 1024 and reloaded.layers[0].vo_head_dim == 56
    assert torch.equal(_logits(reloaded.model), expected)
    # a fresh process that cannot import a3q: transformers reads the index and the shards
    remote = remote_code_logits(path, IDS, "A3LlamaForCausalLM")
    assert (remote - expected).abs().max() <= 1e-6 * expected.abs().max()

    (path / shards[-1]).unlink()  # unchecked loading still names a missing shard
    with pytest.raises(ArtifactError, match=f"{shards[-1]}: weights shard named in {WEIGHTS_INDEX} is missing"):
        a3q.load(str(path), verify=False)


def test_real_a3_then_nf4_on_a_tiny_llama_shards_and_reloads_identically(smollm2, tmp_path):
    """A³ itself (statistics and all, on a tiny Llama) then bitsandbytes NF4: packed 4-bit weights shard too."""
    pytest.importorskip("bitsandbytes")
    from tests.stages.a3.test_pipeline_tiny import graph_of, tiny_llama, tokens

    graph = graph_of(tiny_llama(kv_heads=2, bias=True))
    graph.tokenizer = smollm2.tokenizer  # only so the artifact has one
    graph, _ = apply_stage(graph, "a3", windows=tokens(), qk_rank=10, vo_rank=13, ff_rank=61)
    graph, _ = apply_stage(graph, "bnb", quant_type="nf4")
    assert graph.layers[1].intermediate_size == 61 and graph.layers[1].quantized["q"]["method"] == "bnb"
    path = save_artifact(graph, tmp_path / "tiny", recipe=None, report=[], max_shard_size="20KB")
    shards = _shards(path)
    assert len(shards) > 2 and json.loads((path / "a3q.json").read_text())["weights"]["shards"] == len(shards)
    assert model_folder_problem(path) is None
    probe = tokens(2, 20)
    reloaded = a3q.load(str(path))
    assert [layer.quantized for layer in reloaded.layers] == [layer.quantized for layer in graph.layers]
    assert torch.equal(_logits(reloaded.model, probe), _logits(graph.model, probe))


@pytest.mark.parametrize("value,problem", [
    ("2GB", None), (500_000_000, None), ("1.5 MB", None),
    ("5", "expected a size like '500MB'"), ("0MB", "at least 1 byte"), (True, "max_shard_size"),
    (-1, "at least 1 byte"), ("infGB", "not a finite size"),
])
def test_max_shard_size_is_validated_with_the_recipe(value, problem, tmp_path):
    raw = {"model": "smollm2-135m", "stages": [{"stage": "export", "path": str(tmp_path / "x"), "max_shard_size": value}]}
    if problem is None:
        recipe = parse_recipe(raw)
        assert parse_shard_size(recipe.stages[0].config.max_shard_size) == parse_shard_size(value)
        return
    with pytest.raises(RecipeError) as caught:
        parse_recipe(raw)
    assert any(p.startswith("stages[0] (export): max_shard_size") and problem in p for p in caught.value.problems)
