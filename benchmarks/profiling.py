"""Where a denoiser call's CPU time goes: each engine's per-node timings, summed by node type, and each engine's
wall time.

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
compiles them, inputs bound once), run twice to warm up and profiled on the third run.
:func:`engine_ms` times the same compiled engines alone, in interleaved rounds:
each brick's share of a call's time, beside its share of the FLOPs, for the
skip tables.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.manifest import Manifest
from export.specs import engine_specs
from lego_model.model import LegoModel
from runtimes.backends.openvino import snippets_for, threads_for

Feeds = dict[str, dict[str, np.ndarray]]  # engine name -> its named inputs
# Benchmark backends whose engines these profile and time: name -> (runtime, precision of its float ops (None: as
# the int8 backend runs them, runtimes.backends.precision.int8_rest_precision), precision of its files).
PROFILED = {
    "onnxruntime-cpu": ("onnxruntime", "fp32", "fp32"),
    "openvino-fp32": ("openvino", "fp32", "fp32"),
    "openvino-bf16": ("openvino", "bf16", "fp32"),
    "onnxruntime-int8": ("onnxruntime", "fp32", "int8"),
    "openvino-int8": ("openvino", None, "int8"),
}


def profiled(backend: str) -> tuple[str, str, str]:
    """(runtime, precision of the float ops, precision of the files) of a :data:`PROFILED` backend, on this CPU."""
    runtime, precision, files = PROFILED[backend]
    if precision is None:
        import torch

        from runtimes.backends.precision import int8_rest_precision

        precision = int8_rest_precision(torch.device("cpu"))[0]
    return runtime, precision, files


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
    total: collections.Counter[str] = collections.Counter()
    node_ms = {"onnxruntime": _ort_node_ms, "openvino": _openvino_node_ms}
    for name, feed in feeds.items():
        with tempfile.TemporaryDirectory(prefix="lego-profile-") as tmp:
            engine = _compiled(manifest, engine_dir, runtime, name, feed, precision, threads, profile_dir=tmp)
            total.update(node_ms[runtime](engine))
    return dict(total)


def top_node_types(times: Mapping[str, float], n: int = 5) -> list[tuple[str, float, float]]:
    """The ``n`` node types that took longest: (type, ms, share of the call)."""
    whole = sum(times.values()) or 1.0
    ranked = sorted(times.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [(kind, ms, ms / whole) for kind, ms in ranked]


def engine_ms(
    manifest: Manifest,
    engine_dir: str | Path,
    runtime: str,
    feeds: Feeds,
    *,
    precision: str = "fp32",
    threads: int = 1,
    rounds: tuple[int, int] = (15, 201),
    budget_s: float = 5.0,
) -> dict[str, list[float]]:
    """Engine name -> its wall times per call (ms, one per round): each engine of ``manifest`` alone, compiled as
    :func:`profile_call` compiles it (without the counters), the engines timed in interleaved rounds
    (:func:`benchmarks.harness.interleaved_ms`) after two warm-up calls each."""
    from benchmarks.harness import interleaved_ms

    engines = {
        name: _compiled(manifest, engine_dir, runtime, name, feed, precision, threads) for name, feed in feeds.items()
    }
    for engine in engines.values():
        engine.run()
        engine.run()
    calls = {name: engine.run for name, engine in engines.items()}
    return interleaved_ms(calls, min_rounds=rounds[0], max_rounds=rounds[1], budget_s=budget_s)


@dataclass
class _Engine:
    """One engine compiled for one feed: ``run()`` computes it; ``handle`` is the ONNX Runtime session or the
    OpenVINO infer request (for the profilers)."""

    run: Callable[[], Any]
    handle: Any


def _compiled(
    manifest: Manifest,
    engine_dir: str | Path,
    runtime: str,
    name: str,
    feed: dict[str, np.ndarray],
    precision: str,
    threads: int,
    *,
    profile_dir: str | None = None,
) -> _Engine:
    """Engine ``name`` compiled for ``feed`` as the runtime's backend compiles it; ``profile_dir`` turns on ONNX
    Runtime's profiler (its trace written there) or OpenVINO's per-node counters (``get_profiling_info``)."""
    entry = manifest.engines_for("onnx")[name]
    path = entry.path(engine_dir)
    if runtime == "onnxruntime":
        from export.loaders import SessionSettings, session_from_onnx

        # The ONNX Runtime backend's settings (all optimizations, no spinning).
        prefix = None if profile_dir is None else os.path.join(profile_dir, "profile")
        session = session_from_onnx(path, SessionSettings(threads=threads, profile_prefix=prefix))
        return _Engine(functools.partial(session.run, None, feed), session)
    if runtime != "openvino":
        raise ValueError(f"no profiler for runtime {runtime!r}: onnxruntime or openvino")
    import openvino as ov

    from runtimes.backends.openvino import compile_config

    snippets = snippets_for(manifest.config, entry.brick)
    rows = next(iter(feed.values())).shape[0]
    engine_threads = threads_for(manifest.config, entry.kind, rows, threads)  # as the backend compiles
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({k: list(array.shape) for k, array in feed.items()})  # static, as the backend compiles
    config = compile_config(precision, engine_threads, snippets)  # the OpenVINO backend's settings
    if profile_dir is not None:
        config["PERF_COUNT"] = "YES"
    request = core.compile_model(model, "CPU", config).create_infer_request()
    for k, array in feed.items():
        request.set_tensor(k, ov.Tensor(np.ascontiguousarray(array), shared_memory=True))  # bound once, as the backend
    return _Engine(request.infer, request)


def _ort_node_ms(engine: _Engine) -> collections.Counter[str]:
    for _ in range(3):
        engine.run()
    events = json.loads(Path(engine.handle.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = runs[-1]["ts"]  # the third run only
    out: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= last:
            out[e["args"]["op_name"]] += e["dur"] / 1e3  # microseconds
    return out


def _openvino_node_ms(engine: _Engine) -> collections.Counter[str]:
    for _ in range(3):
        engine.run()  # the counters hold the last run
    out: collections.Counter[str] = collections.Counter()
    for info in engine.handle.get_profiling_info():
        if info.status == info.Status.EXECUTED:
            out[info.node_type] += info.real_time.total_seconds() * 1e3
    return out
