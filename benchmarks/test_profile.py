"""Where the CPU time of one denoiser call goes, per CPU backend and precision: the top node types by time.

One full-stack call at the int8 target's shapes (lego_S_PG_64 batch 1 at
64x64, the shipped model batch 16 at 16x16), every engine profiled by its
runtime's own counters (benchmarks/profiling.py): ONNX Runtime's profiler,
OpenVINO's per-node performance counters.  One thread, so that the node times
add up to the call and do not depend on how the other cores are loaded.
Node types are each runtime's own after its fusions (``FullyConnected`` is
OpenVINO's MatMul with its fused post-ops, ``Subgraph`` a snippets-compiled
fusion, attention included; ``MatMulIntegerToFloat`` ONNX Runtime's int8 product).
"""

from __future__ import annotations

import pytest

from benchmarks.backends import available_backends
from benchmarks.profiling import PROFILED, call_feeds, profile_call, profiled, top_node_types
from benchmarks.test_speed import INT8_TARGET

pytestmark = pytest.mark.benchmark

TOP = 5


@pytest.mark.parametrize("name", list(INT8_TARGET))
def test_profile_top_node_types(bench_models, report, name):
    if name not in bench_models:
        pytest.skip(f"{name} is not available on this machine")
    from export.manifest import load_manifest

    bm = bench_models[name]
    cfg = bm.config
    batch, side = INT8_TARGET[name], cfg.resolution
    feeds = call_feeds(bm.model, batch, side, side)
    for backend in [b for b in available_backends(bm) if b in PROFILED]:
        runtime, precision, files = profiled(backend)
        engine_dir = bm.engines(files)
        times = profile_call(load_manifest(engine_dir), engine_dir, runtime, feeds, precision=precision, threads=1)
        total = sum(times.values())
        for rank, (node_type, ms, share) in enumerate(top_node_types(times, TOP), 1):
            report.add(
                "profile: top node types", model=name, backend=backend, files=files, float_ops=precision,
                batch=batch, size=f"{side}x{side}", rank=rank, node_type=node_type, ms=ms, share=share,
                call_ms=total,
            )  # fmt: skip
