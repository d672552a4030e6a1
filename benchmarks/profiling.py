"""Where a denoiser call's CPU time goes: each engine's per-node timings, summed by node type.

* ONNX Runtime: the session profiler (``SessionOptions.enable_profiling``, a
  chrome-trace JSON with one ``Node`` event per kernel run, named by the op
  type after ONNX Runtime's graph optimizations: ``FusedMatMul``,
  ``MatMulIntegerToFloat``, ``QLinearMatMul``, ...).
* OpenVINO: the CPU plugin's per-node performance counters (``PERF_COUNT``,
  ``InferRequest.get_profiling_info()``), typed by the nodes of the graph the
  plugin executes after its own fusions (``FullyConnected`` with its post-ops,
  ``Subgraph`` for eltwise chains and attention fused by the snippets
  compiler, ``Reorder`` for layout and precision conversions, ...).

One denoiser call is the embedder and every brick on the inputs of one call
at a batch and size (:meth:`export.specs.EngineSpec.sample_inputs`, what the
chain feeds them), each engine compiled as the runtime backends compile it
(:func:`export.loaders.session_from_onnx` with the backend's settings; for
OpenVINO :func:`runtimes.backends.openvino.compile_config` with the backend's
snippets and thread choices, reshaped to the call's static input shapes as the backend
compiles them), run twice to warm up and profiled on the third run.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from export.manifest import Manifest
from export.specs import engine_specs
from lego_model.model import LegoModel
from runtimes.backends.openvino import snippets_for, threads_for

Feeds = dict[str, dict[str, np.ndarray]]  # engine name -> its named inputs


def call_feeds(model: LegoModel, batch: int, height: int, width: int, seed: int = 0) -> Feeds:
    """The engines' inputs of one full-stack denoiser call at this shape."""
    return {
        spec.name: {k: v.numpy() for k, v in spec.sample_inputs(model, batch, height, width, seed=seed).items()}
        for spec in engine_specs(model.config)
    }


def profile_call(
    manifest: Manifest, engine_dir: str | Path, runtime: str, feeds: Feeds, *, precision: str = "fp32", threads: int = 1
) -> dict[str, float]:
    """Node type -> ms of one denoiser call, summed over the engines (ONNX files of ``manifest``).

    ``runtime`` is ``"onnxruntime"`` or ``"openvino"``; ``precision`` the
    OpenVINO inference precision of the float ops (fp32 or bf16; int8 files
    run their QDQ products in int8 whatever it is).
    """
    entries = manifest.engines_for("onnx")
    total: collections.Counter[str] = collections.Counter()
    for name, feed in feeds.items():
        path = entries[name].path(engine_dir)
        if runtime == "onnxruntime":
            total.update(_ort_node_ms(path, feed, threads))
        elif runtime == "openvino":
            snippets = snippets_for(manifest.config, entries[name].brick)
            rows = next(iter(feed.values())).shape[0]
            engine_threads = threads_for(manifest.config, entries[name].kind, rows, threads)  # as the backend compiles
            total.update(_openvino_node_ms(path, feed, precision, engine_threads, snippets))
        else:
            raise ValueError(f"no profiler for runtime {runtime!r}")
    return dict(total)


def top_node_types(times: Mapping[str, float], n: int = 5) -> list[tuple[str, float, float]]:
    """The ``n`` node types that took longest: (type, ms, share of the call)."""
    whole = sum(times.values()) or 1.0
    ranked = sorted(times.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [(kind, ms, ms / whole) for kind, ms in ranked]


def _ort_node_ms(path: Path, feed: dict[str, np.ndarray], threads: int) -> collections.Counter[str]:
    from export.loaders import SessionSettings, session_from_onnx

    with tempfile.TemporaryDirectory(prefix="lego-ort-profile-") as tmp:
        # The ONNX Runtime backend's settings (all optimizations, no spinning), with the profiler on.
        settings = SessionSettings(threads=threads, profile_prefix=os.path.join(tmp, "profile"))
        session = session_from_onnx(path, settings)
        for _ in range(3):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = runs[-1]["ts"]  # the third run only
    out: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= last:
            out[e["args"]["op_name"]] += e["dur"] / 1e3  # microseconds
    return out


def _openvino_node_ms(
    path: Path, feed: dict[str, np.ndarray], precision: str, threads: int, snippets: bool
) -> collections.Counter:
    import openvino as ov

    from runtimes.backends.openvino import compile_config

    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({name: list(array.shape) for name, array in feed.items()})  # static, as the backend compiles
    config = {**compile_config(precision, threads, snippets), "PERF_COUNT": "YES"}  # the OpenVINO backend's settings
    request = core.compile_model(model, "CPU", config).create_infer_request()
    for _ in range(3):
        request.infer(feed)  # the counters hold the last run
    out: collections.Counter[str] = collections.Counter()
    for info in request.get_profiling_info():
        if info.status == info.Status.EXECUTED:
            out[info.node_type] += info.real_time.total_seconds() * 1e3
    return out
