"""Runtimes for LEGO diffusion: backends (torch, onnxruntime, tensorrt), the brick chain, CUDA graphs, sampling.

``Generator`` is the one-call API: ``Generator.from_engine_dir(dir).generate(seeds, ...)``.

Heavy optional libraries (onnxruntime, tensorrt) are imported only inside the backend that needs them.
"""

from runtimes.backends import BACKENDS, Backend, open_backend
from runtimes.backends.base import EngineCall
from runtimes.chain import BrickChain, binding_plan
from runtimes.errors import BackendError, NonFiniteError, OutputError, UsageError
from runtimes.generator import Generator

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "BrickChain",
    "EngineCall",
    "Generator",
    "NonFiniteError",
    "OutputError",
    "UsageError",
    "binding_plan",
    "open_backend",
]
