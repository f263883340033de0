"""The GPTQModel side of benchmarks/gptq_vs_gptqmodel.py: runs in ``.venv-gptqmodel`` (``make gptqmodel-venv``).

It must not import a3q (its pins differ: gptqmodel 7.6.0 needs numpy 2.2.6); only torch, transformers, safetensors
and gptqmodel. Run it with the working directory set to a scratch folder: gptqmodel writes ``./logs/``.

    # quantize a Hugging Face model folder with GPTQModel (CPU), timing only model.quantize()
    .venv-gptqmodel/bin/python benchmarks/gptqmodel_side.py quantize --model DIR --calib calib.safetensors \\
        --out OUT_DIR --bits 4 --group-size 64 --sym [--desc-act] [--damp-percent 0.01] [--act-group-aware] \\
        [--no-true-sequential]
    # load a GPTQ checkpoint folder with plain transformers and score token windows
    .venv-gptqmodel/bin/python benchmarks/gptqmodel_side.py logits --model DIR --tokens eval.safetensors \\
        --out scores.safetensors [--logit-windows 2] [--backend gptq_torch]

``--calib``/``--tokens``: a safetensors file with ``input_ids`` (int64, [windows, seq_len]).

``logits`` is also the check that a GPTQ export (gptqmodel's or a3q's) loads in transformers:
``AutoModelForCausalLM.from_pretrained(dir, device_map="cpu", dtype=float32)``; transformers' GPTQ integration
(optimum + gptqmodel) builds the quantized linears. Its output file holds ``nll`` (float64 [windows], each window's
summed next-token cross-entropy, computed in float64 as in a3q.metrics.perplexity), ``logits`` (float32, the first
``--logit-windows`` windows, all positions), ``logits_fp32_scales`` (the same windows recomputed after upcasting
every quantized linear's fp16 scales to float32, see below) and, in ``OUT.json``, the perplexity
``exp(sum nll / (windows·(seq_len−1)))``, the kernel class and the load/score seconds. Exit status 0 means it loaded
and every loss was finite.

Kernel: by default the quantized linears are forced to GPTQModel's ``gptq_torch`` backend (dequantize to the input
dtype, then a dense matmul: the reference kernel, and it accepts a partial last group, e.g. group 128 on 576 inputs). ``--backend auto``
lets gptqmodel choose (on CPU it picks ``TorchAtenLinear``, an int4pack ATen kernel, which loads such a checkpoint
but fails in the forward with ``_weight_int4pack_mm_cpu: expect K to be divisible by qGroupSize``). ``gptq_torch`` computes
``W = scales[g]·(q − z)`` in the scales' dtype, float16, even in a float32 model: those weights differ from the float32
product by up to ~1e-3, so logits differ from a float32-dequantizing implementation (a3q's) by ~1e-2;
``logits_fp32_scales`` removes that rounding.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
from side_common import read_windows  # noqa: E402 (offline before torch loads)
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def quantize(args: argparse.Namespace) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig

    torch.set_num_threads(args.threads)
    ids = read_windows(args.calib)
    calibration = [{"input_ids": row.unsqueeze(0), "attention_mask": torch.ones_like(row).unsqueeze(0)} for row in ids]
    config = QuantizeConfig(
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        desc_act=args.desc_act,
        # gptqmodel 7.6 defaults to act_group_aware=True (GAR) and damp_percent=0.05; a3q's gptq stage is plain GPTQ
        act_group_aware=args.act_group_aware,
        damp_percent=args.damp_percent,
        damp_auto_increment=args.damp_auto_increment,
        true_sequential=args.true_sequential,
        offload_to_disk=False,
        device="cpu",
    )
    started = time.perf_counter()
    model = GPTQModel.load(args.model, config, dtype=torch.float32)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    model.quantize(calibration, batch_size=1)
    seconds = time.perf_counter() - started
    model.save(args.out)
    result = {
        "tool": "gptqmodel",
        "seconds": seconds,
        "load_seconds": load_seconds,
        "config": {k: getattr(config, k) for k in ("bits", "group_size", "sym", "desc_act", "act_group_aware",
                                                    "damp_percent", "damp_auto_increment", "true_sequential")},
        "calibration": list(ids.shape),
        "threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    Path(args.out, "gptqmodel_quantize.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({"seconds": seconds, "out": args.out}))


def _versions() -> dict[str, str]:
    from importlib import metadata

    return {name: metadata.version(name) for name in ("torch", "transformers", "gptqmodel", "optimum", "numpy")}


@torch.no_grad()
def logits(args: argparse.Namespace) -> None:
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, GPTQConfig

    torch.set_num_threads(args.threads)
    ids = read_windows(args.tokens)
    kwargs = {}
    if args.backend != "auto":
        # only the loading attributes of this config (backend) are merged into the checkpoint's quantization_config
        config = json.loads(Path(args.model, "config.json").read_text())["quantization_config"]
        kwargs["quantization_config"] = GPTQConfig(bits=config["bits"], backend=args.backend)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, device_map="cpu", dtype=torch.float32, **kwargs).eval()
    load_seconds = time.perf_counter() - started
    kernels = sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules()
                      if hasattr(m, "qweight")})
    started = time.perf_counter()
    nll, kept = [], []
    for start in range(0, ids.shape[0], args.batch_size):
        batch = ids[start : start + args.batch_size]
        out = model(input_ids=batch, use_cache=False).logits.float()
        for offset, (window_logits, window) in enumerate(zip(out, batch)):
            nll.append(F.cross_entropy(window_logits[:-1].double(), window[1:], reduction="sum"))
            if start + offset < args.logit_windows:
                kept.append(window_logits.clone())
    score_seconds = time.perf_counter() - started
    nll = torch.stack(nll)
    tensors = {"nll": nll.contiguous()}
    if kept:
        tensors["logits"] = torch.stack(kept).contiguous()
        # gptqmodel's torch kernel dequantizes in the scales' dtype (fp16) whatever the model dtype, which alone moves
        # logits by ~1e-2: the same windows again with the scales upcast to float32 isolate layout differences
        upcast = 0
        for module in model.modules():
            if hasattr(module, "qweight") and getattr(module, "scales", None) is not None:
                module.scales = module.scales.float()
                for reset in ("clear_weight_cache", "_stream_reset_cache"):
                    if hasattr(module, reset):
                        getattr(module, reset)()
                upcast += 1
        if upcast:
            tensors["logits_fp32_scales"] = model(input_ids=ids[: args.logit_windows], use_cache=False).logits.float().contiguous()
    save_file(tensors, args.out)
    predicted = ids.shape[0] * (ids.shape[1] - 1)
    finite = bool(torch.isfinite(nll).all())
    summary = {
        "model": str(args.model),
        "perplexity": math.exp(float(nll.sum()) / predicted) if finite else math.inf,
        "nll_sum": float(nll.sum()),
        "predicted_tokens": predicted,
        "windows": int(ids.shape[0]),
        "finite": finite,
        "backend": args.backend,
        "kernels": kernels,
        "quantized_linears": sum(1 for m in model.modules() if hasattr(m, "qweight")),
        "load_seconds": load_seconds,
        "score_seconds": score_seconds,
        "threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    Path(str(args.out) + ".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("perplexity", "kernels", "quantized_linears", "finite")}))
    if not finite:
        sys.exit(1)
    if not kernels:
        print("no quantized linear was built: transformers did not apply the GPTQ quantization_config", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a HF model folder with GPTQModel on CPU")
    q.add_argument("--model", required=True)
    q.add_argument("--calib", required=True, help="safetensors with input_ids [windows, seq_len]")
    q.add_argument("--out", required=True)
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=64)
    q.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    q.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=False)
    q.add_argument("--act-group-aware", action=argparse.BooleanOptionalAction, default=False,
                   help="GPTQModel's GAR ordering (its default; off here to match plain GPTQ)")
    q.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize q/k/v, o, gate/up, down in turn with updated inputs (GPTQModel's default)")
    q.add_argument("--damp-percent", type=float, default=0.01)
    q.add_argument("--damp-auto-increment", type=float, default=0.01)
    q.add_argument("--threads", type=int, default=2)
    q.set_defaults(func=quantize)
    s = sub.add_parser("logits", help="load a GPTQ folder with plain transformers and score windows")
    s.add_argument("--model", required=True)
    s.add_argument("--tokens", required=True, help="safetensors with input_ids [windows, seq_len]")
    s.add_argument("--out", required=True, help="output safetensors (nll, logits); a .json summary beside it")
    s.add_argument("--logit-windows", type=int, default=2, help="keep full logits of this many leading windows")
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--backend", default="gptq_torch", help="gptqmodel kernel ('auto' lets it choose)")
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(func=logits)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
