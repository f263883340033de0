#!/usr/bin/env bash
# Every GPU number a3q reports, from ONE call on a lent GPU (about 15 minutes of device time per task; this takes at
# most ~8 on one H100). Writes $OUT/gpu_check.json (every step's status, seconds and result) and prints one table.
#
#   run (device tool): bash benchmarks/gpu_check.sh         # $OUT is the device's return folder
#   carry: .venv (a3q's venv with the CPU torch is useless there: the device needs its own CUDA torch), .cache
#
# Steps (each bounded by `timeout`, each recorded even when it fails or is skipped):
#   1. the gpu-marked tests (tests/test_gpu.py and any other `-m gpu`);
#   2. the demo recipe on device: cuda (recipes/demo.yaml with the device overridden);
#   3. the A³ pass for an 8B-shaped layer (benchmarks/a3_speed.py --shape llama-3.1-8b --layers 1, extrapolated);
#   4. the serving benchmark (benchmarks/serve.py) where vLLM with CUDA is installed; skipped, and said so, where not.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export A3Q_CACHE_DIR="${A3Q_CACHE_DIR:-$PWD/.cache}"
RESULTS="$OUT/steps.jsonl"
: > "$RESULTS"

step() {  # step NAME SECONDS COMMAND...: run it, record status and time
  local name="$1" limit="$2"; shift 2
  local start end status
  start=$(date +%s.%N)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  status=$?
  end=$(date +%s.%N)
  "$PY" - "$name" "$status" "$start" "$end" "$OUT/$name.log" >> "$RESULTS" <<'EOF'
import json, sys
name, status, start, end, log = sys.argv[1:]
tail = open(log, errors="replace").read()[-2000:]
print(json.dumps({"step": name, "status": int(status), "seconds": round(float(end) - float(start), 1), "tail": tail}))
EOF
}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
  > "$OUT/device.txt" 2>&1 || { cat "$OUT/device.txt"; exit 1; }

step gpu-tests 240 "$PY" -m pytest -q -m gpu tests
sed 's/^device:.*$/device: cuda/' recipes/demo.yaml > "$OUT/demo-cuda.yaml"
grep -q '^device:' "$OUT/demo-cuda.yaml" || sed -i '1i device: cuda' "$OUT/demo-cuda.yaml"
step demo-cuda 180 "$PY" -m a3q run "$OUT/demo-cuda.yaml" --out "$OUT/demo"
step a3-8b-layer 120 "$PY" benchmarks/a3_speed.py --device cuda --shape llama-3.1-8b --layers 1 \
  --json "$OUT/a3_speed_8b.json"
if "$PY" -c "import vllm" > /dev/null 2>&1; then
  step serve 240 "$PY" benchmarks/serve.py --json "$OUT/serve.json" --repeats 2
else
  echo '{"step": "serve", "status": null, "seconds": 0, "tail": "skipped: vLLM (CUDA build) is not installed on this machine"}' >> "$RESULTS"
fi

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
result = {"device": (out / "device.txt").read_text().strip(), "steps": steps}
for name in ("a3_speed_8b", "serve"):
    path = out / f"{name}.json"
    if path.is_file():
        result[name] = json.loads(path.read_text())
(out / "gpu_check.json").write_text(json.dumps(result, indent=2))
print(f"GPU check on {result['device']}")
print(f"{'step':<14}{'status':>8}{'seconds':>10}")
for s in steps:
    status = "skipped" if s["status"] is None else ("ok" if s["status"] == 0 else f"rc {s['status']}")
    print(f"{s['step']:<14}{status:>8}{s['seconds']:>10.1f}")
EOF
