"""The backends a benchmark compares, each as a denoiser ``D(x, sigma, active)`` for one batch shape.

``eager`` and ``compile`` call the reference model directly (what a user of
plain PyTorch runs); every other name goes through the runtime's brick chain
exactly as ``python -m runtimes.sample`` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from benchmarks.conftest import BenchModel

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

    from runtimes.backends import open_backend
    from runtimes.chain import BrickChain

    kind = {"torch-graphs": "torch"}.get(backend, backend)
    be, _ = open_backend(kind, engine_dir=bm.engine_dir)
    if kind == "torch":
        be.model = model  # the already loaded reference weights
    with be:
        chain = BrickChain(be, cuda_graphs=backend == "torch-graphs")
        chain.begin(labels, batch=batch, height=height, width=width, cfg_scale=cfg_scale, num_steps=num_steps)
        if be.device == DEVICE:
            yield chain
        else:  # ONNX Runtime on the CPU of a GPU machine: hand D back where the sampler keeps x

            def moved(x: Tensor, sigma: Tensor, active: tuple[int, ...]) -> Tensor:
                return chain(x, sigma, active).to(x.device)

            yield moved
        chain.end()
