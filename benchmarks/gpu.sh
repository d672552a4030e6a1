#!/usr/bin/env bash
# The GPU part of the benchmarks, as one command for a lent GPU machine (no registry access there; torch and the
# CPU build of onnxruntime installed, no TensorRT). Runs in well under 8 minutes on one H100:
#   bash benchmarks/gpu.sh [OUT_DIR]          # results under OUT_DIR (default: $OUT, else benchmarks/results)
# pytest benchmarks/ --benchmark on the shipped model and lego_S_PG_64: eager CUDA, torch.compile, the runtime's
# torch backend with CUDA graphs, ONNX Runtime (CUDA where its GPU build is present), and test_runtime.py's
# CUDA graphs against no graphs (parity, timing, allocation growth across a replayed run).
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "benchmarks/gpu.sh: no CUDA GPU visible; run it on a GPU machine (the CPU benchmarks: pytest benchmarks/ --benchmark)" >&2
    exit 1
fi
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 LEGO_BENCH_RESULTS="$out" LEGO_BENCH_MODELS="${LEGO_BENCH_MODELS:-shipped,lego_S_PG_64}"
timeout 480 python -m pytest benchmarks/ --benchmark -q -p no:cacheprovider 2>&1 | tee "$out/benchmarks.txt"
