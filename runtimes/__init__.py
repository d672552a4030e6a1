"""Runtimes for LEGO diffusion: backends (TensorRT, ONNX Runtime CUDA/CPU, OpenVINO, torch) in one registry,
the brick chain, CUDA graphs, the Generator API and the sample CLI.

``Generator`` is the one-call API: ``Generator.from_engine_dir(dir).generate(seeds, ...)``, or
``gen.generate(gen.request(seeds, ...))`` with a :class:`Request` built once and reused.

Heavy optional libraries (onnxruntime, openvino, tensorrt, diffusers) are imported only inside the backend
that needs them.
"""

from lego_model.request import Churn, Request
from runtimes.backends import BACKENDS, REGISTRY, Backend, BackendOptions, open_backend
from runtimes.backends.base import EngineCall
from runtimes.chain import BrickChain, binding_plan
from runtimes.errors import BackendError, NonFiniteError, OutputError, UsageError
from runtimes.generator import Generator

__all__ = [
    "BACKENDS",
    "REGISTRY",
    "Backend",
    "BackendError",
    "BackendOptions",
    "BrickChain",
    "Churn",
    "EngineCall",
    "Generator",
    "NonFiniteError",
    "OutputError",
    "Request",
    "UsageError",
    "binding_plan",
    "open_backend",
]
