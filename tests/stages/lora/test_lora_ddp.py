"""The ``lora`` stage under DistributedDataParallel: two gloo processes train the adapter one process trains.

``batch_size`` is the global batch (split over the processes), so the same recipe gives the same training with any
number of processes up to float summation order. The maths and plumbing are checked on the tiny random Llama of
``test_lora.py`` (real text windows) in float64, where summation order costs ~1e-15, so a tolerance of 1e-10 leaves
no room for a real difference (in float32 the same comparison gives ~2e-5: AdamW divides each gradient by its own
magnitude, which amplifies last-bit differences where a gradient is tiny; see docs/distributed.md). The global
batch of 3 splits unevenly (2 + 1 windows), so a wrong per-rank weighting of the loss would show; gradient
checkpointing is on in the two processes and off in the one, which must not matter either.
"""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from a3q import distributed
from a3q.engine import apply_stage, distributed_problems
from a3q.recipe import parse_recipe
from a3q.stages.lora import stage as lora_stage
from a3q.stages.lora import teacher as teacher_module
from a3q.stages.lora.config import LoraConfig
from a3q.stages.lora.train import training_windows
from tests.stages.lora.test_kd_stage import save_teacher
from tests.stages.lora.test_lora import lora_weights, tiny_graph


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: 5 AdamW steps of a global batch of 3 windows × 32 tokens (2 + 1 windows per process with two)
FIELDS = dict(r=4, alpha=8, steps=5, batch_size=3, seq_len=32, lr=1e-2, dropout=0.0)
TOLERANCE = 1e-10  # relative, per adapter tensor, in float64


def _train_in_rank(rank: int, port: int, graph, pool: torch.Tensor, out: str, extra: dict | None = None) -> None:
    """One rank of a 2-process gloo group: the lora stage on ``graph``; saves its adapter and report fields.

    ``pool``: the parent's training windows (what the stage would cut itself, passed so that no process tokenizes
    the corpus split again)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), A3Q_COLLECTIVE_TIMEOUT_S="120")
    torch.set_num_threads(1)
    lora_stage.training_windows = lambda *args, **kwargs: pool
    assert distributed.init("cpu") and distributed.backend() == "gloo"
    try:
        trained, metrics = apply_stage(graph, "lora", LoraConfig(**FIELDS, **(extra or {}), gradient_checkpointing=True))
        leftovers = [name for name, tensor in [*trained.model.named_parameters(), *trained.model.named_buffers()]
                     if hasattr(tensor, "_ddp_ignored")] + [type(m).__name__ for m in trained.model.modules()
                                                          if hasattr(m, "_ddp_params_and_buffers_to_ignore")]
        torch.save({"weights": lora_weights(trained), "metrics": metrics, "leftovers": leftovers},
                   Path(out) / f"rank{rank}.pt")
    finally:
        distributed.destroy()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("loss", ["lm", "kd"])
def test_two_gloo_processes_train_the_adapter_one_process_trains(smollm2_path, tmp_path, one_thread, loss,
                                                                 monkeypatch):
    """Forked ranks (a spawned one would spend ~7 s CPU importing torch, transformers and PEFT again) start from
    the parent's model and windows; the parent trains the one-process reference meanwhile.

    ``kd``: each rank runs the teacher over (and caches) only the windows it trains on; the teacher runs one window
    per forward here, so that its float32 targets do not depend on how the windows were batched."""
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path))
    extra = {}
    if loss == "kd":
        monkeypatch.setattr(teacher_module, "LOGITS_BUDGET", 1)
        extra = dict(loss="kd", teacher_top_k=16, teacher=str(save_teacher(tokenizer, tmp_path / "teacher", seed=1)))
    config = LoraConfig(**FIELDS, **extra)
    pool = training_windows(tokenizer, config, config.seq_len, config.steps * config.batch_size,
                            config.seed)
    tiny = tiny_graph(tokenizer)
    tiny.model.to(torch.float64)
    ranks = torch.multiprocessing.start_processes(
        _train_in_rank, args=(_free_port(), tiny, pool, str(tmp_path), extra), nprocs=2, join=False,
        start_method="fork")
    reference, metrics = apply_stage(copy.deepcopy(tiny), "lora", config)
    while not ranks.join():
        pass
    saved = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    expected = lora_weights(reference)
    assert expected and all(tensor.dtype == torch.float64 for tensor in expected.values())

    assert saved[0]["leftovers"] == [] and saved[1]["leftovers"] == []  # DDP's marks are removed after training
    # every rank holds the very same adapter (DDP's averaged gradients; the stage's check repaired nothing)
    assert all(torch.equal(saved[0]["weights"][k], saved[1]["weights"][k]) for k in expected)
    parallel = saved[0]["metrics"]
    assert parallel["world_size"] == 2 and parallel["rank_batch"] == [2, 1] and parallel["adapter_repairs"] == 0
    assert parallel["tokens"] == metrics["tokens"] == 5 * 3 * 32 and parallel["steps"] == 5
    assert saved[1]["metrics"]["loss_curve"] == parallel["loss_curve"]  # the global loss, the same on every rank
    assert "world_size" not in metrics
    if loss == "kd":  # the teacher cache is sharded like the windows: 15 windows, 10 + 5 over the two ranks
        assert [saved[r]["metrics"]["teacher_cache_bytes"] for r in range(2)] == [
            n * 31 * (16 * 8 + 4) for n in (10, 5)]
        assert metrics["teacher_cache_bytes"] == 15 * 31 * (16 * 8 + 4)

    worst = max(float((saved[0]["weights"][k] - expected[k]).norm() / expected[k].norm()) for k in expected)
    print(f"LoRA weights, 2 gloo processes vs 1 (float64, 5 steps, global batch 3): worst relative difference "
          f"{worst:.1e}")
    assert all(expected[k].abs().max() > 1e-3 for k in expected if "lora_B" in k)  # training moved the zero init
    assert worst <= TOLERANCE
    torch.testing.assert_close(torch.tensor(parallel["loss_curve"]), torch.tensor(metrics["loss_curve"]),
                               rtol=TOLERANCE, atol=0)


def test_a_global_batch_smaller_than_the_processes_is_refused_before_loading():
    recipe = parse_recipe({"model": "smollm2-135m", "stages": [{"stage": "lora", "batch_size": 2}]})
    assert distributed_problems(recipe, 1) == distributed_problems(recipe, 2) == []
    (problem,) = distributed_problems(recipe, 4)
    assert problem.startswith("stages[0] (lora): batch_size: 2 is the global batch and cannot be shared by 4 "
                              "processes")
    assert "batch_size ≥ 4" in problem
