#!/usr/bin/env bash
# Every GPU measurement in one command, in about 5 minutes on one card: the CUDA tests, then
# each benchmark on CUDA. Writes Markdown and JSON, with the device, torch, CUDA and driver
# versions, into the folder given (default gpu-results/). Needs the test extra (the
# reference libraries) and a CUDA device.
#   bash benchmarks/gpu.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-results}
mkdir -p "$out"
python=${PYTHON:-python}
"$python" - "$out/machine.json" <<'PY'
import json, subprocess, sys, torch
assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA device"
try:
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, check=True).stdout.strip()
except (OSError, subprocess.CalledProcessError):
    driver = "unknown"
info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "driver": driver}
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
PY
# A failing step (a CUDA test, a benchmark whose maps disagree) is reported at the end;
# the other steps still run.
failed=""
"$python" -m pytest -q tests/test_cuda.py -p no:cacheprovider | tee "$out/cuda-tests.txt" \
    || failed="$failed tests"
"$python" benchmarks/bench_gradcam.py --device cuda --batches 64 --repeats 10 \
    --json "$out/gradcam.json" | tee "$out/gradcam.md" || failed="$failed gradcam"
"$python" benchmarks/bench_methods.py --device cuda --repeats 5 --slow-repeats 3 \
    --json "$out/methods.json" | tee "$out/methods.md" || failed="$failed methods"
"$python" benchmarks/bench_run.py --device cuda --images 512 --batch-size 64 --workers 8 \
    --json "$out/run.json" | tee "$out/run.md" || failed="$failed run"
echo "wrote $out/: machine.json, cuda-tests.txt, gradcam.{md,json}, methods.{md,json}, run.{md,json}"
if [ -n "$failed" ]; then echo "failed:$failed (see their files in $out/)"; exit 1; fi
