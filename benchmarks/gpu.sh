#!/usr/bin/env bash
# The GPU part of the benchmarks, as one command for a lent GPU machine (no registry access there; torch and the
# CPU build of onnxruntime installed, no TensorRT). Runs in well under 8 minutes on one H100:
#   bash benchmarks/gpu.sh [OUT_DIR]          # results under OUT_DIR (default: $OUT, else benchmarks/results)
# 1. scripts/runtime_gpu_check.py: CUDA graphs vs no graphs (torch backend), parity and timing, lego_S_PG_64.
# 2. pytest benchmarks/ --benchmark on the shipped model and lego_S_PG_64: eager CUDA, torch.compile, the runtime's
#    torch backend with CUDA graphs, ONNX Runtime (CUDA where its GPU build is present).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 LEGO_BENCH_RESULTS="$out" LEGO_BENCH_MODELS="${LEGO_BENCH_MODELS:-shipped,lego_S_PG_64}"
status=0
timeout 180 python scripts/runtime_gpu_check.py 2>&1 | tee "$out/runtime_gpu_check.txt" || status=1
timeout 300 python -m pytest benchmarks/ --benchmark -q -p no:cacheprovider 2>&1 | tee "$out/benchmarks.txt" || status=1
exit $status
