"""The llm-compressor side of benchmarks/gptq_peers.py: runs in ``.venv-llmcompressor`` (``make llmcompressor-venv``).

It must not import a3q: llm-compressor 0.14.0.1 pins ``transformers<=5.17`` (a3q pins 5.23), so it lives in its own
venv with only torch, transformers, safetensors and llmcompressor. Run it with the working directory set to a scratch
folder (llm-compressor may write logs there).

    .venv-llmcompressor/bin/python benchmarks/llmcompressor_side.py --model DIR --calib calib.safetensors \\
        --eval enwiki=enwiki.safetensors news=news.safetensors --out result.json \\
        --bits 4 --group-size 64 [--actorder static|none] [--damp 0.01] [--threads 1]

``--calib``/``--eval``: safetensors files with ``input_ids`` (int64, [windows, seq_len]), written by the a3q side
from a3q's own window functions, so both tools see the same tokens. The calibration windows are handed to
``oneshot`` as a ``datasets.Dataset`` of ``input_ids``/``attention_mask`` rows of exactly that length, with
``shuffle_calibration_samples=False`` (its default shuffles the order, which moves float32 sums) and
``num_calibration_samples`` = all of them.

Timed: ``oneshot(...)`` only (not loading the model). After it the model holds llm-compressor's fake-quantized weights
(its GPTQ writes ``Q`` back and the forward quantizes with the stored scales), so perplexity is computed in-process,
as a3q.metrics.perplexity does: float64 cross-entropy per window, summed, ``exp(sum / (windows·(seq_len−1)))``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from side_common import read_windows  # noqa: E402 (offline before torch loads)
import torch  # noqa: E402


@torch.no_grad()
def _perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy), each window's loss in float64, as a3q.metrics.perplexity."""
    import torch.nn.functional as F

    total = 0.0
    for window in ids:
        logits = model(input_ids=window[None], use_cache=False).logits[0].float()
        total += float(F.cross_entropy(logits[:-1].double(), window[1:], reduction="sum"))
    return math.exp(total / (ids.shape[0] * (ids.shape[1] - 1)))


def _versions() -> dict[str, str]:
    from importlib import metadata

    return {name: metadata.version(name) for name in ("torch", "transformers", "llmcompressor", "compressed-tensors",
                                                      "numpy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", nargs="+", default=[], help="NAME=tokens.safetensors, scored after quantizing")
    parser.add_argument("--out", required=True, help="result JSON")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--actorder", default="default",
                        help="'default' (the modifier's own: static in 0.14), 'none', 'static'/'weight' or 'group'")
    parser.add_argument("--damp", type=float, default=None, help="dampening_frac (default: the modifier's, 0.01)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    ids = read_windows(args.calib)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=args.sym, strategy="group",
                               group_size=args.group_size)
    modifier_kwargs: dict = {"config_groups": {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                             "ignore": ["lm_head"]}
    if args.actorder != "default":
        modifier_kwargs["actorder"] = None if args.actorder == "none" else args.actorder
    if args.damp is not None:
        modifier_kwargs["dampening_frac"] = args.damp
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, device_map="cpu").eval()
    modifier = GPTQModifier(**modifier_kwargs)
    started = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=[modifier], num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
    seconds = time.perf_counter() - started
    resolved = None
    for group in (getattr(modifier, "config_groups", None) or {}).values():
        resolved = str(getattr(group.weights, "actorder", None))
    perplexities = {}
    for item in args.eval:
        name, path = item.split("=", 1)
        perplexities[name] = _perplexity(model, read_windows(path))
    result = {"tool": "llmcompressor", "seconds": seconds, "perplexity": perplexities,
              "settings": {"actorder": args.actorder, "actorder_resolved": resolved, "damp": args.damp,
                           "bits": args.bits, "group_size": args.group_size, "sym": args.sym},
              "calibration": list(ids.shape), "threads": torch.get_num_threads(), "versions": _versions()}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"seconds": seconds, "perplexity": perplexities, "actorder": resolved}))


if __name__ == "__main__":
    main()
