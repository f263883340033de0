"""vLLM serving benchmark on this CPU: dense vs A³ artifacts, as vLLM serves them (docs/serving.md, "Measured").

Run in the serving venv (``make serve-setup``)::

    .venv-serve/bin/python benchmarks/serve.py [--a3 out/smollm2-a3-20] [--extra NAME=PATH ...] [--json OUT]

For each model, in its own process (one vLLM engine at a time), with vLLM's default execution (torch.compile;
``--eager`` to skip it), ``--dtype`` (default bfloat16: what vLLM picks on a CPU for these float32 checkpoints),
prefix caching off (every prompt is really prefilled):

* **throughput** (output tokens/s over the whole request, prefill included) and **time to first token** (mean over
  the batch, vLLM's own per-request metric), at batch 1 and batch 16, with 512-token prompts (distinct windows of
  held-out Wikipedia) and 128 new tokens (``ignore_eos``); median of ``--repeats`` runs per engine, and of
  ``--rounds`` engines per model started in interleaved order (dense, A³, dense, A³, …: on a shared machine the load
  drifts, and interleaving spreads the drift over every model);
* **KV capacity**: with a fixed KV budget (``--kv-gib``, vLLM's ``VLLM_CPU_KVCACHE_SPACE``) and ``max_model_len``
  2048, the tokens vLLM's cache holds and how many concurrent 2048-token sequences fit (vLLM's reported maximum
  concurrency), and the KV bytes per token it allocates (budget / tokens) beside the unpadded A³ size.

Default models: dense SmolLM2-135M (``$A3Q_CACHE_DIR/models/smollm2-135m``) and the A³ 20% artifact (``--a3``;
``make demo`` writes ``out/smollm2-a3-20``, ``make serve-test`` ``out/serving-tests/smollm2-a3-20``: same sizes).
Prints one table (with the CPU model) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("A3Q_CACHE_DIR", REPO / ".cache"))


def cpu_info() -> dict:
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = [name for name, flag in (("AVX-512", "avx512f"), ("AMX", "amx_tile"), ("AVX2", "avx2")) if flag in flags]
    return {"model": model, "cores": os.cpu_count(), "isa": isa, "machine": platform.machine()}


def wiki_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """``count`` distinct ``length``-token windows of a3q's held-out enwiki split."""
    articles = json.loads((CACHE / "corpora" / "enwiki-v1.json").read_text())
    text = "\n\n".join(a["text"] for i, a in enumerate(articles) if i % 5 == 4)
    ids = tokenizer(text).input_ids
    if len(ids) < count * length:
        raise SystemExit(f"held-out text has {len(ids)} tokens, fewer than {count}x{length}")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def measure(path: str, args) -> dict:
    """One model: build the engine, read its KV capacity, time the batches. Runs in a child process."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_gib)
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    batches = [int(b) for b in args.batches.split(",")]
    started = time.perf_counter()
    llm = LLM(model=path, dtype=args.dtype, max_model_len=args.context, enforce_eager=args.eager,
              enable_prefix_caching=False, max_num_seqs=max(batches), disable_log_stats=False, seed=0)
    load_s = time.perf_counter() - started
    cache = llm.llm_engine.vllm_config.cache_config
    budget = args.kv_gib * (1 << 30)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in wiki_prompts(tokenizer, max(batches), args.prompt_len)]
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    runs = {}
    for batch in batches:
        rates, ttfts = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            outs = llm.generate(prompts[:batch], params, use_tqdm=False)
            wall = time.perf_counter() - started
            assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)
            rates.append(batch * args.new_tokens / wall)
            latencies = [o.metrics.first_token_latency for o in outs if o.metrics is not None]
            ttfts.append(statistics.mean(latencies) if latencies and min(latencies) > 0 else float("nan"))
        runs[batch] = {"output_tok_s": statistics.median(rates), "ttft_s": statistics.median(ttfts),
                       "all_output_tok_s": rates, "all_ttft_s": ttfts}
    config = json.loads((Path(path) / "config.json").read_text())
    kv_bytes_unpadded = None
    try:
        import types

        from a3q.serving.padding import BACKENDS, kv_bytes_per_token, padding_plan

        fields = dict(config)
        fields.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
        dtype_bytes = 4 if args.dtype == "float32" else 2
        plan = padding_plan(types.SimpleNamespace(**fields), BACKENDS["cpu"])
        kv_bytes_unpadded, kv_bytes_planned = kv_bytes_per_token(plan, config["num_key_value_heads"], dtype_bytes)
    except (ImportError, KeyError, ValueError):
        kv_bytes_planned = None
    return {
        "path": path, "architecture": config.get("architectures", ["?"])[0], "dtype": args.dtype,
        "load_s": load_s, "runs": runs,
        "kv_budget_bytes": budget, "kv_cache_tokens": cache.kv_cache_size_tokens,
        "max_concurrency_at_context": cache.kv_cache_max_concurrency,
        "sequences_that_fit": int(cache.kv_cache_size_tokens // args.context),
        "kv_bytes_per_token_allocated": budget / cache.kv_cache_size_tokens,
        "kv_bytes_per_token_planned": kv_bytes_planned, "kv_bytes_per_token_unpadded": kv_bytes_unpadded,
        "weights_bytes": sum(f.stat().st_size for f in Path(path).glob("*.safetensors")),
    }


def table(results: dict, cpu: dict, args) -> str:
    batches = [int(b) for b in args.batches.split(",")]
    dense = next(iter(results.values()))
    head = ["model"] + [f"b{b} tok/s" for b in batches] + [f"b{b} TTFT ms" for b in batches] + [
        "KV B/tok (unpadded)", f"{args.context}-tok seqs (max conc.)", f"vs dense (b{batches[-1]} tok/s, seqs)"]
    rows = [head]
    for name, r in results.items():
        last = batches[-1]
        ratio = (f"{r['runs'][last]['output_tok_s'] / dense['runs'][last]['output_tok_s']:.2f}x, "
                 f"{r['sequences_that_fit'] / dense['sequences_that_fit']:.2f}x")
        unpadded = r["kv_bytes_per_token_unpadded"]
        rows.append([name] + [f"{r['runs'][b]['output_tok_s']:.1f}" for b in batches]
                    + [f"{1000 * r['runs'][b]['ttft_s']:.0f}" for b in batches]
                    + [f"{r['kv_bytes_per_token_allocated']:,.0f} ({unpadded:,})" if unpadded else
                       f"{r['kv_bytes_per_token_allocated']:,.0f}",
                       f"{r['sequences_that_fit']} ({r['max_concurrency_at_context']:.2f})", ratio])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = [f"CPU: {cpu['model']} ({cpu['cores']} cores, {', '.join(cpu['isa'])}); vLLM CPU, {args.dtype}, "
             f"{'eager' if args.eager else 'torch.compile'}, prompts {args.prompt_len} tokens, {args.new_tokens} new "
             f"tokens, KV budget {args.kv_gib} GiB, max_model_len {args.context}; medians of {args.repeats} runs x "
             f"{args.rounds} interleaved rounds"]
    for i, row in enumerate(rows):
        lines.append(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", default=str(CACHE / "models" / "smollm2-135m"))
    default_a3 = REPO / "out" / "smollm2-a3-20"
    if not default_a3.is_dir():
        default_a3 = REPO / "out" / "serving-tests" / "smollm2-a3-20"
    parser.add_argument("--a3", default=str(default_a3), help="the A³ 20%% artifact, as exported (padded on CPU)")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=PATH",
                        help="more artifacts (e.g. kernel-aware ranks)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--eager", action="store_true", help="skip torch.compile")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size in one engine (median)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="engines per model, interleaved across models (median of the rounds' medians)")
    parser.add_argument("--kv-gib", type=int, default=1)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--json", default=str(REPO / "out" / "bench" / "serve.json"))
    parser.add_argument("--child", nargs=2, metavar=("PATH", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.child[1]).write_text(json.dumps(measure(args.child[0], args)))
        return
    models = {"dense": args.dense, "A³ 20% (padded)": args.a3}
    for item in args.extra:
        name, _, path = item.partition("=")
        models[name] = path
    for name, path in models.items():
        if not (Path(path) / "config.json").is_file():
            raise SystemExit(f"{name}: {path} is not a model folder (make the A³ artifact with `make demo`, or "
                             f"pass --a3 PATH)")
    cpu = cpu_info()
    forwarded = [a for a in sys.argv[1:]]
    rounds: dict[str, list[dict]] = {name: [] for name in models}
    for round_index in range(args.rounds):  # models interleaved, so a change in the machine's load hits them alike
        for name, path in models.items():
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                print(f"[serve bench] round {round_index + 1}/{args.rounds} {name}: {path}", file=sys.stderr,
                      flush=True)
                subprocess.run([sys.executable, __file__, *forwarded, "--child", path, out.name], check=True)
                result = json.loads(Path(out.name).read_text())
                result["runs"] = {int(batch): run for batch, run in result["runs"].items()}
                rounds[name].append(result)
    results = {}
    for name, per_round in rounds.items():
        result = dict(per_round[0])
        result["runs"] = {batch: {"output_tok_s": statistics.median(r["runs"][batch]["output_tok_s"] for r in per_round),
                                  "ttft_s": statistics.median(r["runs"][batch]["ttft_s"] for r in per_round),
                                  "per_round": [r["runs"][batch] for r in per_round]}
                          for batch in per_round[0]["runs"]}
        results[name] = result
    report = {"cpu": cpu, "settings": {k: v for k, v in vars(args).items() if k != "child"}, "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(table(results, cpu, args))
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
