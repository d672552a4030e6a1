"""The backends a benchmark compares, each as a denoiser ``D(x, sigma, active)`` for one batch shape.

``eager`` and ``compile`` call the reference model directly (what a user of
plain PyTorch runs); every other name goes through the runtime's brick chain
exactly as ``python -m runtimes.sample`` does.  :func:`chain_batch` is the one place the benchmarks use the
chain, :func:`run_engine` the one place they call an engine alone.  Names ending in ``-fp32`` / ``-bf16`` are
one runtime backend at a run-time precision (``--precision``, :data:`RUNTIME`): ``openvino-*`` where
OpenVINO is installed, ``torch-bf16`` and ``openvino-bf16`` only where the hardware has bf16 units
(elsewhere the runtime refuses bf16).  ``openvino-int8`` and ``onnxruntime-int8`` run the model's int8
export (``lego-export --precision int8``; :meth:`BenchModel.engines`), where NNCF is installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from benchmarks.conftest import BenchModel
from lego_model.sampler import Solver

if TYPE_CHECKING:
    from runtimes.backends import Backend
    from runtimes.chain import BrickChain

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
Denoise = Callable[[Tensor, Tensor, tuple[int, ...]], Tensor]


# Benchmark name -> (runtime backend, --precision); names not listed are the runtime backend at fp32.
RUNTIME = {
    "torch-graphs": ("torch", "fp32"),
    "torch-bf16": ("torch", "bf16"),
    "openvino-fp32": ("openvino", "fp32"),
    "openvino-bf16": ("openvino", "bf16"),
    "openvino-int8": ("openvino", "int8"),
    "onnxruntime-int8": ("onnxruntime-cpu", "int8"),
}
INT8_BACKENDS = ("openvino-int8", "onnxruntime-int8")


def precision_of(backend: str) -> str:
    """The compute precision a benchmarked backend runs at."""
    return RUNTIME.get(backend, (backend, "fp32"))[1]


def _bf16_hardware() -> bool:
    from runtimes.backends.precision import cpu_bf16_units, gpu_bf16_units

    return gpu_bf16_units(DEVICE)[0] if DEVICE.type == "cuda" else bool(cpu_bf16_units())


def available_backends(bm: BenchModel | None = None) -> list[str]:
    """Backends this machine can run, eager first; the int8 ones only for a model with an int8 export (any model
    when ``bm`` is None and NNCF is installed: the tests skip models without one, :meth:`BenchModel.engines`)."""
    import importlib.util

    from runtimes.backends.openvino import openvino_available

    names = ["eager", "compile", "onnxruntime-cpu"]
    if openvino_available():
        names += ["openvino-fp32", "openvino-bf16"] if _bf16_hardware() else ["openvino-fp32"]
    int8 = importlib.util.find_spec("nncf") is not None if bm is None else bm.int8_dir is not None
    if DEVICE.type == "cpu" and int8:
        names += ["onnxruntime-int8", *(["openvino-int8"] if openvino_available() else [])]
    if DEVICE.type == "cuda":
        names += ["torch-graphs"]
        from runtimes.backends.ort import cuda_provider_available

        if cuda_provider_available():
            names.append("onnxruntime-cuda")
    if _bf16_hardware():
        names.append("torch-bf16")  # on CUDA with graphs, like torch-graphs
    return names


_compiled: dict[int, torch.nn.Module] = {}


@contextlib.contextmanager
def denoiser(
    bm: BenchModel,
    backend: str,
    *,
    batch: int,
    height: int,
    width: int,
    labels: Tensor | None,
    cfg_scale: float | None = None,
    num_steps: int | None = None,
    threads: int | None = None,
) -> Iterator[Denoise]:
    """A ready denoiser of ``backend`` for this batch shape; outputs are float32 on DEVICE.

    ``threads`` goes to the runtime's CPU backends (ONNX Runtime, OpenVINO; default: every core); the torch
    paths use torch's own setting (``torch.set_num_threads``).
    """
    model = bm.model.to(DEVICE)
    labels = None if labels is None else labels.to(DEVICE)
    if backend in ("eager", "compile"):
        fn = model
        if backend == "compile":
            fn = _compiled.setdefault(id(model), torch.compile(model, dynamic=False))

        def eager(x: Tensor, sigma: Tensor, active: tuple[int, ...]) -> Tensor:
            with torch.inference_mode():
                return fn(x.to(DEVICE), sigma.to(DEVICE), labels, active, cfg_scale)

        yield eager
        return

    with (
        open_engines(bm, backend, threads=threads) as be,
        chain_batch(
            be,
            labels,
            batch=batch,
            height=height,
            width=width,
            cfg_scale=cfg_scale,
            num_steps=num_steps,
            cuda_graphs=be.name == "torch",  # graphs only where the device is CUDA
        ) as (_, fn),
    ):
        if be.device == DEVICE:
            yield fn
        else:  # ONNX Runtime on the CPU of a GPU machine: hand D back where the sampler keeps x

            def moved(x: Tensor, sigma: Tensor, active: tuple[int, ...]) -> Tensor:
                return fn(x, sigma, active).to(x.device)

            yield moved


@contextlib.contextmanager
def open_engines(bm: BenchModel, backend: str, **options: Any) -> Iterator[Backend]:
    """The runtime backend of ``backend`` (a runtime name or a :data:`RUNTIME` name) over ``bm``'s engine
    directory, loaded; the torch backend runs bm's own weights (no second copy on the device).

    ``options`` go to :func:`runtimes.backends.open_backend` (threads, ort_optimization).
    """
    from runtimes.backends import open_backend

    kind, precision = RUNTIME.get(backend, (backend, "fp32"))
    if kind == "torch":
        # The already loaded reference weights, on DEVICE in eval mode: load() runs them as they are.
        model = bm.model.to(DEVICE).eval()
        be, _ = open_backend("torch", checkpoint=model, device=DEVICE, precision=precision)  # torch sets its threads
    else:
        be, _ = open_backend(kind, engine_dir=bm.engines(precision), precision=precision, **options)
    with be:
        yield be


@contextlib.contextmanager
def chain_batch(
    backend: Backend,
    labels: Tensor | None,
    *,
    batch: int,
    height: int,
    width: int,
    cfg_scale: float | None = None,
    num_steps: int | None = None,
    solver: Solver = "heun",
    cuda_graphs: bool = False,
) -> Iterator[tuple[BrickChain, Denoise]]:
    """The runtime's brick chain over ``backend``, set up for one batch: (the chain, its denoiser).

    Every benchmark goes through the chain here and nowhere else, so a change of the chain's
    batch lifecycle is one edit.  Leaving the block runs the chain's end-of-batch NaN/Inf check.
    """
    from runtimes.chain import BrickChain

    chain = BrickChain(backend, cuda_graphs=cuda_graphs)
    kw = dict(batch=batch, height=height, width=width, cfg_scale=cfg_scale, num_steps=num_steps, solver=solver)
    with chain.batch(labels, **kw) as denoise:
        yield chain, denoise


def run_engine(backend: Backend, engine: str, inputs: dict[str, Tensor], outputs: dict[str, Tensor]) -> None:
    """One engine (``embedder`` or ``brick<k>``) alone on caller-made tensors: the backend's call, in one place."""
    from runtimes.backends.base import EngineCall

    if engine == "embedder":
        call = EngineCall(engine, None, None, "cond")
    else:
        k = int(engine.removeprefix("brick"))
        call = EngineCall(engine, k, "f0" if k else None, "f1")
    backend.infer(call, inputs, outputs)
