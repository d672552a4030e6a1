"""Runtimes for LEGO diffusion: backends (torch, onnxruntime, tensorrt), the brick chain, CUDA graphs, sampling.

Heavy optional libraries (onnxruntime, tensorrt) are imported only inside the backend that needs them.
"""

from runtimes.backends import BACKENDS, Backend, open_backend
from runtimes.backends.base import EngineCall
from runtimes.chain import BrickChain, binding_plan
from runtimes.errors import BackendError, NonFiniteError, OutputError

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "BrickChain",
    "EngineCall",
    "NonFiniteError",
    "OutputError",
    "binding_plan",
    "open_backend",
]
