#!/usr/bin/env bash
# The GPU run of the project as one unattended command (a lent GPU machine: torch with CUDA, onnx, onnxruntime's
# CPU build; no registry access, no TensorRT, OpenVINO or diffusers -- what needs them skips, saying why):
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default: $OUT, else benchmarks/results/gpu-latest
#
# 1. tests/runtimes/test_gpu.py: CUDA graphs, the whole-loop graph and (where installed) TensorRT against eager,
#    on the GPU (the CPU suite checks the same code on a fake GPU);
# 2. benchmarks/test_gpu.py: the figures of issue 19 (per-call times, whole runs at batch 1 and 64, FLOP/s
#    against the measured bf16 peak, parity, allocation growth, bf16 quality, profiler traces).
#
# Writes at most 6 files into OUT_DIR: environment.txt, pytest.log (as each test ends), results.json and
# summary.md (rewritten after every test, so a timeout keeps what finished), profile_b1.json.gz and
# profile_b64.json.gz.  Stops after LEGO_GPU_SECONDS (default 330) so that the run fits 6 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

# The interpreter: $PYTHON, else this checkout's .venv, else python3 / python -- the first whose torch sees a GPU.
py=""
with_torch=""
for candidate in "${PYTHON:-}" .venv/bin/python python3 python; do
    [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
    "$candidate" -c 'import torch' 2>/dev/null || continue
    with_torch="$with_torch $candidate"
    if "$candidate" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        py="$candidate"
        break
    fi
done
if [ -z "$py" ]; then
    if [ -z "$with_torch" ]; then
        echo "benchmarks/gpu.sh: no Python with torch found (tried \$PYTHON, .venv/bin/python, python3, python)" >&2
    else
        echo "benchmarks/gpu.sh: no CUDA GPU visible to torch in:$with_torch; run it on a GPU machine" >&2
    fi
    exit 1
fi

out="${1:-${OUT:-benchmarks/results/gpu-latest}}"
mkdir -p "$out"
{
    echo "python: $(command -v "$py") ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
    "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0))'
    "$py" - <<'EOF'
import importlib.metadata as md
for name in ("onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt", "openvino", "diffusers", "pytest"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not found"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

export PYTHONUNBUFFERED=1 LEGO_BENCH_OUT="$out"
timeout --signal=INT --kill-after=20 "${LEGO_GPU_SECONDS:-330}" \
    "$py" -m pytest tests/runtimes/test_gpu.py benchmarks/test_gpu.py --benchmark -v -rs -p no:cacheprovider \
    2>&1 | tee "$out/pytest.log"
status=${PIPESTATUS[0]}
if [ "$status" -eq 124 ] || [ "$status" -eq 130 ]; then
    echo "benchmarks/gpu.sh: stopped after ${LEGO_GPU_SECONDS:-330} s; the results of the tests that finished are in $out" | tee -a "$out/pytest.log"
fi
exit "$status"
