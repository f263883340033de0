"""Data-parallel calibration (a3q.distributed): exact reductions, real gloo collectives, failing ranks, end to end.

The reductions are checked in-process with the stages' own ``reduce_statistics`` and a fake ``reduce`` (two halves
of the inputs, summed); the collectives with two real gloo processes; a dying or hanging rank through the launcher;
and a whole A³ + GPTQ + export run in two processes against the same recipe in one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from a3q import distributed
from a3q.quant.gptq import HessianAccumulator
from a3q.stages.a3.layer_stage import HeadSpaceCompression
from a3q.stages.a3.statistics import LayerStatistics, _head_moment
from a3q.stages.baselines.common import InputStatistics
from a3q.stages.baselines.svd_llm import SVDLLMConfig, SVDLLMStage
from a3q.stages.gptq import GPTQConfig, GPTQStage

ROOT = Path(__file__).resolve().parents[1]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))


def _reduce_pair(first, second, index: int = 0) -> int:
    """Reduce ``first`` and ``second`` (two "ranks" of one stage) with a fake two-process sum; returns the number of
    ``reduce`` calls a rank made."""
    buffers: list[torch.Tensor] = []

    def record(tensor):
        buffers.append(tensor.clone())
        return tensor

    second.reduce_statistics(index, record)
    calls = iter(buffers)
    first.reduce_statistics(index, lambda tensor: tensor + next(calls))
    return len(buffers)


def test_a3_statistics_reduce_exactly():
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, d, ff = 3, 1, 8, 20
    inputs = {"g_q": torch.randn(64, heads * d, dtype=torch.float64, generator=generator),
              "g_k": torch.randn(64, kv_heads * d, dtype=torch.float64, generator=generator),
              "g_v": torch.randn(64, kv_heads * d, dtype=torch.float64, generator=generator),
              "mlp_x2": torch.randn(64, ff, dtype=torch.float64, generator=generator)}

    def accumulate(rows: slice) -> LayerStatistics:
        stats = LayerStatistics()
        for name, values in inputs.items():
            part = values[rows]
            stats.add(name, part.square().sum(0) if name == "mlp_x2" else
                      _head_moment(part, heads if name == "g_q" else kv_heads))
        stats.tokens += inputs["g_q"][rows].shape[0]
        return stats

    halves = []
    for rows in (slice(0, 40), slice(40, 64)):
        stage = HeadSpaceCompression(frozenset({"qk", "ov", "mlp"}), 0.0, "dense", 4)
        stage.layer_statistics[0] = accumulate(rows)
        halves.append(stage)
    assert _reduce_pair(*halves) == 1  # one collective for the whole layer
    reduced = halves[0].layer_statistics[0]
    reduced.finish()
    full = accumulate(slice(0, 64))
    full.finish()
    assert reduced.tokens == full.tokens == 64
    for name in inputs:
        _close(getattr(reduced, name), getattr(full, name))


def test_gptq_hessians_reduce_exactly():
    generator = torch.Generator().manual_seed(1)
    inputs = {"q+k+v": torch.randn(2, 30, 16, dtype=torch.float64, generator=generator),
              "o": torch.randn(2, 30, 12, dtype=torch.float64, generator=generator)}

    def stage_for(batches: slice) -> GPTQStage:
        stage = GPTQStage(GPTQConfig(bits=4, group_size=4))
        for key, values in inputs.items():
            stage.hessians[key] = HessianAccumulator(values.shape[-1])
            for batch in values[batches]:
                stage.hessians[key].add(batch)
        stage.forward_order = list(inputs)
        return stage

    first, second = stage_for(slice(0, 1)), stage_for(slice(1, 2))
    assert _reduce_pair(first, second) == 1
    full = stage_for(slice(0, 2))
    for key in inputs:
        assert first.hessians[key].tokens == full.hessians[key].tokens == 60
        _close(first.hessians[key].hessian(), full.hessians[key].hessian())

    # true-sequential: a later round reduces only the group it just measured
    sequential = GPTQStage(GPTQConfig(bits=4, group_size=4, true_sequential=True))
    sequential.hessians = {key: HessianAccumulator(values.shape[-1]) for key, values in inputs.items()}
    sequential.pending = ["o"]
    seen = []
    sequential.reduce_statistics(0, lambda tensor: seen.append(tensor.numel()) or tensor)
    assert seen == [12 * 12 + 1]


def test_baseline_input_statistics_reduce_exactly():
    generator = torch.Generator().manual_seed(2)
    inputs = {"attn_in": torch.randn(50, 10, dtype=torch.float64, generator=generator),
              "down_in": torch.randn(50, 14, dtype=torch.float64, generator=generator)}
    shared = {"q": "attn_in", "k": "attn_in", "down": "down_in"}

    def stage_for(rows: slice) -> SVDLLMStage:
        stage = SVDLLMStage(SVDLLMConfig(rank=2))
        by_input = {key: InputStatistics() for key in inputs}
        for key, values in inputs.items():
            by_input[key].add(values[rows], moments=True)
        stage.layer_statistics[0] = {name: by_input[key] for name, key in shared.items()}
        return stage

    first, second = stage_for(slice(0, 17)), stage_for(slice(17, 50))
    assert _reduce_pair(first, second) == 1
    full = stage_for(slice(0, 50))
    for stats in (first.layer_statistics[0], full.layer_statistics[0]):
        for unique in {id(s): s for s in stats.values()}.values():
            unique.finish()
    for name in shared:
        mine, theirs = first.layer_statistics[0][name], full.layer_statistics[0][name]
        assert mine.tokens == theirs.tokens == 50
        _close(mine.second_moment, theirs.second_moment)
        _close(mine.mean_abs, theirs.mean_abs)
    assert first.layer_statistics[0]["q"] is first.layer_statistics[0]["k"]  # shared inputs stay shared


def test_one_process_is_a_no_op_and_shards_name_the_problem():
    tensor = torch.arange(4.0)
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_reduce_sum(tensor) is tensor
    windows = torch.arange(10).reshape(5, 2)
    assert distributed.shard(windows) is windows
    shares = distributed.WindowShares(5, 1, 2)
    parts = [windows[shares.windows_of(i)] for i in range(2)]
    assert torch.equal(torch.cat(parts), windows) and [p.shape[0] for p in parts] == [3, 2]
    assert [shares.batches_of(i) for i in range(2)] == [slice(0, 3), slice(3, 5)]
    assert distributed.WindowShares(1, 1, 2).problem().startswith(
        "1 window(s) in batches of 1 make 1 batch(es), too few for 2 processes")
    assert "calibration.windows ≥ 2" in distributed.WindowShares(1, 1, 2).problem()
    assert distributed.WindowShares(1, 1, 2).windows_of(1) == slice(1, 1)  # evaluation: a process may get none
    assert "≥ 5, a smaller batch_size, or at most --nproc 1" in distributed.WindowShares(4, 4, 2).problem()
    assert distributed.WindowShares(4, 4, 1).problem() is None
    # one rule for every split: LoRA's global batch (batch_size 1) splits as torch.tensor_split did
    for count, world in ((3, 2), (7, 3), (2, 4)):
        rule = distributed.WindowShares(count, 1, world)
        assert [torch.arange(count)[rule.windows_of(r)].tolist() for r in range(world)] == [
            part.tolist() for part in torch.arange(count).tensor_split(world)]


@pytest.mark.parametrize(("count", "batch_size", "world"), [(4, 3, 2), (8, 4, 2), (10, 4, 2), (17, 4, 3), (9, 2, 4),
                                                            (5, 1, 2)])
def test_shards_are_whole_batches_of_the_one_process_run(count, batch_size, world):
    """Each rank's batches are exactly batches of the one-process run (same windows, same shapes, in order), so a
    rank runs the very GEMMs one process runs: float32 activations agree bit for bit at any batch size."""
    windows = torch.arange(count * 3).reshape(count, 3)
    one_process = torch.split(windows, batch_size)
    rule = distributed.WindowShares(count, batch_size, world)
    shares = [windows[rule.windows_of(index)] for index in range(world)]
    assert all(share.shape[0] > 0 for share in shares)
    by_rank = [batch for share in shares for batch in torch.split(share, batch_size)]
    assert len(by_rank) == len(one_process)
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(by_rank, one_process))
    sizes = [len(torch.split(share, batch_size)) for share in shares]
    assert max(sizes) - min(sizes) <= 1  # balanced in batches


def test_training_stages_are_refused_in_a_distributed_run():
    from a3q.engine import distributed_problems
    from a3q.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "a3-20-lora.yaml", check_model=False)
    assert distributed_problems(recipe, 1) == []
    (problem,) = distributed_problems(recipe, 2)
    assert "(lora)" in problem and "2 processes" in problem


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _collective_worker(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), A3Q_COLLECTIVE_TIMEOUT_S="60")
    torch.set_num_threads(1)
    assert distributed.init("cpu") and distributed.backend() == "gloo"
    try:
        values = torch.tensor([0.1, 1e-17, 3.0], dtype=torch.float64) * (rank + 1)
        assert torch.equal(distributed.all_reduce_sum(values), values / (rank + 1) + values / (rank + 1) * 2)
        counts = torch.tensor([2**53 - 1 - rank, rank], dtype=torch.int64)
        assert distributed.all_reduce_sum(counts).tolist() == [2**54 - 3, 1]
        a, b = distributed.reduce_together([torch.full((2, 2), float(rank)), torch.tensor([5 + rank])],
                                           distributed.all_reduce_sum)
        assert torch.equal(a, torch.ones(2, 2)) and a.shape == (2, 2) and b.tolist() == [11]
        assert distributed.shard(torch.arange(6).reshape(3, 2)).shape[0] == (2 if rank == 0 else 1)
        torch.manual_seed(0)
        layer = torch.nn.Linear(3, 2)
        assert distributed.check_identical(layer, "same layer") is False
        with torch.no_grad():
            layer.weight[0, 0] += rank  # ranks disagree: rank 0's values win
        assert distributed.check_identical(layer, "different values") is True
        reference = distributed.broadcast_object(layer.weight.tolist())
        assert layer.weight.tolist() == reference
        if rank == 1:
            layer = torch.nn.Linear(3, 4)
        with pytest.raises(distributed.DistributedError, match="different shapes"):
            distributed.check_identical(layer, "different shapes")
        assert distributed.broadcast_object({"rank": rank}) == {"rank": 0}
    finally:
        distributed.destroy()


def test_all_reduce_sum_in_two_gloo_processes():
    torch.multiprocessing.spawn(_collective_worker, args=(_free_port(),), nprocs=2, join=True)


_DYING_RANK = """
import os, sys, time
from a3q import distributed
rank = int(os.environ["RANK"])
if sys.argv[1] == "exit" and rank == 1:
    sys.exit(3)  # dies before joining: rank 0 waits in the rendezvous until the agent stops it
distributed.init("cpu")
if sys.argv[1] == "hang" and rank == 1:
    time.sleep(600)  # never reaches the barrier: rank 0's collective times out
distributed.barrier()
"""


@pytest.mark.parametrize("failure, rank, code", [("exit", 1, 3), ("hang", 0, 1)])
def test_a_failing_rank_ends_the_launch_naming_it(tmp_path, failure, rank, code):
    script = tmp_path / "worker.py"
    script.write_text(_DYING_RANK)
    env = {**os.environ, "A3Q_COLLECTIVE_TIMEOUT_S": "5", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", f"from a3q.distributed import launch; launch(2, [{str(script)!r}, {failure!r}], "
         "module=False)"], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert f"rank      : {rank}" in result.stderr or f"rank: {rank}" in result.stderr, result.stderr[-3000:]
    assert f"exitcode  : {code}" in result.stderr or f"exitcode: {code}" in result.stderr, result.stderr[-3000:]
    assert elapsed < 60, f"the launcher took {elapsed:.0f} s to notice"


_RECIPE = """
model: smollm2-135m
device: cpu
checkpoint_every: 0
calibration: {{corpus: enwiki, split: calib, windows: 4, seq_len: 128, seed: 0}}
stages:
  - stage: a3
    ratio: 0.2
    allocation: uniform
    batch_size: 3
  - stage: gptq
    bits: 4
    group_size: 64
    batch_size: 3
    skip_modules: ["mlp."]
  - stage: export
    path: {artifact}
"""


def test_two_processes_match_one(tmp_path):
    """A³ 20% + GPTQ 4-bit g64 (attention only) + export, on 4 windows × 128 tokens: two gloo processes vs one.

    Batches of 3 windows: one process runs a batch of 3 then a batch of 1; the shares are whole batches
    (:class:`a3q.distributed.WindowShares`), so rank 0 runs the batch of 3 and rank 1 the batch of 1, the very GEMMs
    of the one process, and the sums of the same float64 batch products agree bit for bit. (When shares were cut by
    windows, 2 + 2, the float32 activations differed in the last bits and GPTQ's error feedback cascaded them into
    92% equal codes at batch size 4.)
    """
    from a3q.calib.sources import TextSource
    from a3q.calib.windows import sequential_windows
    from a3q.io.loading import load_graph
    from a3q.modeling.a3q_gptq_linear import GPTQLinear

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    runs = {}
    for world in (1, 2):
        recipe = tmp_path / f"recipe{world}.yaml"
        recipe.write_text(_RECIPE.format(artifact=tmp_path / f"artifact{world}"))
        command = [sys.executable, "-m", "a3q.cli", "run", str(recipe), "--out", str(tmp_path / f"out{world}"),
                   "--nproc", str(world)]
        runs[world] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for world, process in runs.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-4000:]
    reports = {world: json.loads((tmp_path / f"out{world}" / "report.json").read_text()) for world in (1, 2)}
    assert reports[1]["world_size"] == 1 and reports[2]["world_size"] == 2
    assert reports[2]["distributed"]["backend"] == "gloo" and reports[2]["distributed"]["layer_repairs"] == 0
    assert reports[2]["checkpoint"]["writes"] == 0  # checkpoint_every: 0
    rows = {world: {row["stage"]: row for row in report["stages"]} for world, report in reports.items()}
    assert rows[1]["a3"]["ranks"] == rows[2]["a3"]["ranks"]
    assert rows[1]["a3"]["calibration_tokens"] == rows[2]["a3"]["calibration_tokens"] == 4 * 128

    one, two = (load_graph(str(tmp_path / f"artifact{world}")) for world in (1, 2))
    codes = {name: (module.codes(), dict(two.model.named_modules())[name].codes())
             for name, module in one.model.named_modules() if isinstance(module, GPTQLinear)}
    assert len(codes) == 30 * 4
    agreement = sum(int((a == b).sum()) for a, b in codes.values()) / sum(a.numel() for a, _ in codes.values())
    print(f"GPTQ code agreement, 2 processes vs 1: {agreement:.6%}")
    assert agreement >= 0.999
    windows = sequential_windows(one.tokenizer, TextSource(corpus="enwiki", split="test"), 128, 2)
    with torch.no_grad():
        expected, actual = (graph.model(input_ids=windows).logits.double() for graph in (one, two))
    relative = float((actual - expected).norm() / expected.norm())
    print(f"exported logits, 2 processes vs 1: relative difference {relative:.2e}")
    assert relative <= 1e-5
