"""The backends a benchmark compares, each as a denoiser ``D(x, sigma, active)`` for one batch shape.

``eager`` and ``compile`` call the reference model directly (what a user of
plain PyTorch runs); every other name goes through the runtime's brick chain
exactly as ``python -m runtimes.sample`` does.  :func:`chain_batch` is the one place the benchmarks use the
chain, :func:`run_engine` the one place they call an engine alone.
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


def available_backends() -> list[str]:
    """Backends this machine can run, eager first."""
    names = ["eager", "compile", "onnxruntime-cpu"]
    if DEVICE.type == "cuda":
        names += ["torch-graphs"]
        from runtimes.backends.ort import cuda_provider_available

        if cuda_provider_available():
            names.append("onnxruntime-cuda")
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
) -> Iterator[Denoise]:
    """A ready denoiser of ``backend`` for this batch shape; outputs are float32 on DEVICE."""
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

    kind = {"torch-graphs": "torch"}.get(backend, backend)
    with (
        open_engines(bm, kind) as be,
        chain_batch(
            be,
            labels,
            batch=batch,
            height=height,
            width=width,
            cfg_scale=cfg_scale,
            num_steps=num_steps,
            cuda_graphs=backend == "torch-graphs",
        ) as (_, fn),
    ):
        if be.device == DEVICE:
            yield fn
        else:  # ONNX Runtime on the CPU of a GPU machine: hand D back where the sampler keeps x

            def moved(x: Tensor, sigma: Tensor, active: tuple[int, ...]) -> Tensor:
                return fn(x, sigma, active).to(x.device)

            yield moved


@contextlib.contextmanager
def open_engines(bm: BenchModel, kind: str, **options: Any) -> Iterator[Backend]:
    """The runtime backend ``kind`` over ``bm``'s engine directory, loaded; the torch backend reuses bm's weights.

    ``options`` go to :func:`runtimes.backends.open_backend` (threads, ort_optimization).
    """
    from runtimes.backends import open_backend

    be, _ = open_backend(kind, engine_dir=bm.engine_dir, **options)
    if kind == "torch":
        be.model = bm.model.to(DEVICE)  # the already loaded reference weights
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
