"""Soak: mixed requests through every CPU backend in one process, several chains per backend, all against eager.

The 200-request figures on the shipped model (resident memory after 10/50/100/200 requests,
requests/s) come from ``python -m benchmarks.soak``; this runs the same mix, shorter, on a tiny config.
"""

from __future__ import annotations

import importlib.util

import pytest

from benchmarks.harness import current_rss_mib
from benchmarks.soak import mixed_requests, soak
from runtimes import BACKENDS, Generator, open_backend
from tests.runtimes.conftest import tiny_model

REQUESTS = 24
CHAINS = 3  # generators sharing one backend
BUFFER_SETS = 4  # fewer than the mix's (batch, size, guidance) combinations: the LRU evicts and rebuilds


def cpu_backends() -> list[str]:
    names = ["torch", "onnxruntime-cpu"]
    if "openvino" in BACKENDS and importlib.util.find_spec("openvino") is not None:
        names.append("openvino")
    return names


@pytest.mark.slow
@pytest.mark.parametrize("kind", cpu_backends())
def test_mixed_requests_through_shared_backend_equal_eager(engines_pg, kind, capsys):
    model = tiny_model("tiny_PG_16")
    requests = list(mixed_requests(model.config, REQUESTS, seed=1, max_batch=3, max_side=32))
    assert len({(len(r["seeds"]), r["size"], r["cfg_scale"] is not None) for r in requests}) > BUFFER_SETS
    # fp32 everywhere: the soak checks exactness against eager fp32 (bf16 has its own tolerance tests).
    options = {"device": "cpu"} if kind == "torch" else {"threads": 1, "precision": "fp32"}
    backend, _ = open_backend(kind, engine_dir=engines_pg, **options)
    with backend:
        generators = [Generator(backend, max_buffer_sets=BUFFER_SETS) for _ in range(CHAINS)]
        result = soak(generators, model, requests, checkpoints=(1, REQUESTS // 2, REQUESTS))
        assert all(len(g.chain) <= BUFFER_SETS for g in generators)
        bindings = getattr(backend, "_bindings", None)
        if bindings is not None:
            assert len(bindings) <= bindings.size
        for gen in generators:
            gen.close()  # a borrowed backend stays loaded for the others
        assert backend.loaded
    assert result.requests == REQUESTS
    assert result.max_rel_err <= 1e-4, f"{kind}: max relative error {result.max_rel_err:.2e}"
    with capsys.disabled():
        rss = ", ".join(f"{n}: {mib:.0f} MiB" for n, mib in result.rss_mib.items())
        print(f"\n[soak {kind}] max rel. error {result.max_rel_err:.1e}; RSS after {rss}; now {current_rss_mib():.0f}")
