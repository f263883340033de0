"""Load an exported model in a FRESH Python process that cannot import a3q, and return its logits.

Shared by every test that proves an artifact is self-sufficient under ``trust_remote_code=True``.
Tensors cross the process boundary as safetensors (no pickle).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["a3q"] = None  # importing a3q would raise: the checkpoint must be self-sufficient
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    directory, io_path, expected_class, device_map, remote_class, adapter, threads = sys.argv[1:8]
    torch.set_num_threads(int(threads))  # the caller's: float32 GEMMs split their sums by thread
    kwargs = {"device_map": device_map} if device_map else {}
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, **kwargs).eval()
    assert not expected_class or type(model).__name__ == expected_class, type(model)
    if remote_class == "1":
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    if adapter:  # base + LoRA adapter, through PEFT alone
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        out = model(input_ids=load_file(io_path)["ids"]).logits
    save_file({"logits": out.contiguous()}, io_path + ".out")
    """
)


def remote_code_logits(
    directory: Path | str, ids: torch.Tensor, expected_class: str = "", device_map: str | None = None,
    remote_class: bool = True, adapter: Path | str | None = None,
) -> torch.Tensor:
    """Logits of ``AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)`` on ``ids``.

    ``device_map`` is passed on when given; ``remote_class=False`` accepts a transformers class (a checkpoint of a
    dense architecture, e.g. bitsandbytes-quantized Llama) instead of requiring one from the artifact's own code.
    With ``adapter`` (a PEFT adapter folder), the logits of ``PeftModel.from_pretrained(model, adapter)``.
    The fresh process uses the caller's number of torch threads: a CPU's float32 kernels split their sums by thread,
    so only the same count gives the same arithmetic (on an Intel Xeon, 1 vs 2 threads moved A³ + GPTQ logits by
    4e-5).
    """
    directory = Path(directory)
    io_path = directory.parent / f"{directory.name}-io.safetensors"
    save_file({"ids": ids.contiguous()}, str(io_path))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(directory.parent / "hf_modules"))
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(directory), str(io_path), expected_class, device_map or "",
         "1" if remote_class else "0", str(adapter or ""), str(torch.get_num_threads())],
        cwd=directory.parent, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return load_file(str(io_path) + ".out")["logits"]
