"""Backends behind one interface (:class:`Backend`) and the ``--backend auto`` choice."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lego_model.checkpoints import load_checkpoint
from lego_model.errors import LegoError
from runtimes.backends.base import Backend
from runtimes.errors import BackendError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime-cuda", "openvino", "onnxruntime-cpu", "torch")

__all__ = ["BACKENDS", "Backend", "choose_backend", "open_backend"]


def choose_backend(
    requested: str, *, formats: list[str], trt_problem: str | None, ort_cuda: bool, openvino: bool = False
) -> tuple[str, str]:
    """(backend, why) for ``--backend``: auto prefers TensorRT, then ONNX Runtime CUDA, then on the CPU
    OpenVINO when installed, else ONNX Runtime.

    ``formats`` are the engine formats of the directory; ``trt_problem`` is why
    its TensorRT engines cannot run here (None when they can); ``ort_cuda``
    whether ONNX Runtime has a usable CUDA execution provider; ``openvino``
    whether OpenVINO is installed.  On the CPU the benchmark found OpenVINO
    the faster of the two on every CPU it ran on (fp32: 1.3x ONNX Runtime on
    an AMX Xeon; bf16 where the CPU has bf16 units: several times faster).
    """
    if requested not in BACKENDS:
        raise BackendError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested, "requested"
    skipped = []
    if "tensorrt" in formats:
        if trt_problem is None:
            return "tensorrt", "TensorRT engines match this GPU and TensorRT"
        skipped.append(f"TensorRT engines unusable ({trt_problem})")
    else:
        skipped.append("no TensorRT engines")
    if "onnx" in formats:
        if ort_cuda:
            return "onnxruntime-cuda", "; ".join([*skipped, "ONNX Runtime has CUDA"])
        skipped.append("no CUDA for ONNX Runtime")
        if openvino:
            return "openvino", "; ".join([*skipped, "OpenVINO is the fastest CPU backend in the benchmarks"])
        return "onnxruntime-cpu", "; ".join([*skipped, "OpenVINO not installed (pip install 'lego-deploy[cpu]')"])
    raise BackendError(
        "the engine directory holds no engines this machine can run (" + "; ".join(skipped) + "); "
        "export ONNX files with lego-export --engines onnx, or use --backend torch"
    )


def _device(kind: str, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")


def open_backend(
    requested: str = "auto",
    *,
    engine_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
    config: str | None = None,
    local_rank: int = 0,
    threads: int | None = None,
    ort_optimization: str = "all",
    ort_arena: bool = True,
    device: str | torch.device | None = None,
    precision: str = "auto",
) -> tuple[Backend, str]:
    """Build (not yet enter) the backend for a sampling run, and say why it was chosen.

    ``threads``: intra-op threads of ONNX Runtime's and OpenVINO's sessions
    (default: the usable cores).  ``ort_arena``: ONNX Runtime's CPU memory arena
    (off: the sessions allocate from the system allocator instead).
    ``device``: where the torch backend runs ("cpu", "cuda", "cuda:1"; default
    GPU ``local_rank`` when torch sees one, else the CPU); engine backends run
    where their engines do.  ``config`` names the architecture of a
    ``checkpoint`` that carries none.  ``precision`` (auto, fp32, bf16) is
    chosen at load time by OpenVINO and torch; ONNX Runtime and TensorRT run
    the precision the files were exported in.  Everything that can refuse
    (manifest checks, missing libraries or GPU, engines built for another GPU
    or TensorRT, a precision the backend cannot run) refuses here, before any
    compute.
    """
    from runtimes.backends.openvino import openvino_available
    from runtimes.backends.ort import cuda_provider_available

    if config is not None and (requested != "torch" or checkpoint is None):
        raise BackendError("--config names the architecture of a --checkpoint for --backend torch; leave it out")
    if device is not None and requested != "torch":
        raise BackendError(
            f"device= chooses where the torch backend runs; backend {requested!r} runs where its engines do "
            "(pass backend='torch' with device=)"
        )
    if engine_dir is None:
        if requested != "torch" or checkpoint is None:
            raise BackendError("--engine-dir is required (only --backend torch --checkpoint FILE runs without engines)")
        model = load_checkpoint(checkpoint, config)
        return _torch_backend(model, local_rank, device, precision), "requested, weights from --checkpoint"

    from export.manifest import load_manifest

    manifest = load_manifest(engine_dir)
    formats = manifest.formats()
    trt_problem = None
    if requested in ("auto", "tensorrt"):
        trt_problem = _tensorrt_problem(manifest, local_rank) if "tensorrt" in formats else "no TensorRT engines"
        if requested == "tensorrt" and trt_problem is not None:
            raise BackendError(f"cannot use --backend tensorrt: {trt_problem}")
    ort_cuda = requested in ("auto", "onnxruntime-cuda") and cuda_provider_available()
    name, why = choose_backend(
        requested, formats=formats, trt_problem=trt_problem, ort_cuda=ort_cuda, openvino=openvino_available()
    )

    if name == "torch":
        from runtimes.backends.torch_backend import model_from_manifest

        model = (
            load_checkpoint(checkpoint, config or manifest.config)
            if checkpoint
            else model_from_manifest(manifest, engine_dir)
        )
        return _torch_backend(model, local_rank, device, precision), why
    if name == "openvino":
        from runtimes.backends.openvino import OpenVinoBackend, import_openvino

        import_openvino()  # refuse here, naming the extra, rather than when the backend loads
        return OpenVinoBackend(manifest, engine_dir, precision=precision, threads=threads), why
    _check_file_precision(name, precision, manifest.engines_for("tensorrt" if name == "tensorrt" else "onnx"))
    if name == "tensorrt":
        from runtimes.backends.trt import TensorRTBackend

        return TensorRTBackend(manifest, engine_dir, device=_device("cuda", local_rank)), why
    from runtimes.backends.ort import OnnxRuntimeBackend

    if name == "onnxruntime-cuda" and not cuda_provider_available():
        raise BackendError("--backend onnxruntime-cuda needs onnxruntime-gpu and a visible GPU; use onnxruntime-cpu")
    kind = "cuda" if name == "onnxruntime-cuda" else "cpu"
    backend = OnnxRuntimeBackend(
        manifest,
        engine_dir,
        device=_device(kind, local_rank),
        threads=threads,
        optimization=ort_optimization,
        arena=ort_arena,
    )
    return backend, why


def _torch_backend(
    model, local_rank: int, device: str | torch.device | None = None, precision: str = "auto"
) -> Backend:
    from runtimes.backends.torch_backend import TorchBackend

    if device is None:
        device = _device("cuda" if torch.cuda.is_available() else "cpu", local_rank)
    return TorchBackend(model, device=device, precision=precision)


def _check_file_precision(backend: str, precision: str, entries) -> None:
    """Refuse a --precision other than the files' own for backends that run the files as exported."""
    if precision == "auto":
        return
    kinds = sorted({e.precision for e in entries.values()})
    if kinds != [precision]:
        raise BackendError(
            f"{backend} runs the precision the engines were exported in ({'/'.join(kinds)}), not {precision}; "
            f"use --backend openvino or torch for {precision} at run time, or re-export with --precision {precision}"
        )


def _tensorrt_problem(manifest, local_rank: int) -> str | None:
    """Why the manifest's TensorRT engines cannot run in this process, or None."""
    from runtimes.backends.trt import check_engines_here

    try:
        check_engines_here(manifest.engines_for("tensorrt"), _device("cuda", local_rank))
    except LegoError as err:
        return str(err)
    return None
