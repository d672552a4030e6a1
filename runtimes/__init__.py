"""Runtimes for LEGO diffusion: backends (TensorRT, ONNX Runtime CUDA/CPU, OpenVINO, torch) in one registry,
the brick chain, CUDA graphs, the Generator API and the sample CLI.

``Generator`` is the one-call API: ``Generator.from_engine_dir(dir).generate(seeds, ...)``, or
``gen.generate(gen.request(seeds, ...))`` with a :class:`Request` built once and reused.

Heavy optional libraries (onnxruntime, openvino, tensorrt, diffusers) are imported only inside the backend
that needs them.
"""

import itertools as _itertools
import os as _os
import signal as _signal
import sys as _sys


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C before ``runtimes.sample.main`` runs: nothing is written yet, so say so in one line and exit."""
    _os.write(2, b"interrupted: nothing was written (the command was still starting)\n")
    _os._exit(130)


def _started_as_sample() -> bool:
    """Whether this is ``python -m runtimes.sample`` (or ``-m runtimes``, torchrun's workers) importing its package:
    while the module is located, ``sys.argv[0]`` is ``"-m"``."""
    argv = list(getattr(_sys, "orig_argv", ()))
    targets = {b for a, b in _itertools.pairwise(argv) if a == "-m"}
    return _sys.argv[:1] == ["-m"] and bool(targets & {"runtimes", "runtimes.sample"})


# The imports below load torch and the backends (seconds); a Ctrl-C meanwhile would end in a traceback.  Only for
# the command, never for a program that imports the package; runtimes.sample.main puts Python's handler back.
if _started_as_sample() and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)

from lego_model.request import Churn, Request  # noqa: E402
from runtimes.backends import BACKENDS, REGISTRY, Backend, BackendOptions, open_backend  # noqa: E402
from runtimes.backends.base import EngineCall  # noqa: E402
from runtimes.chain import BrickChain, binding_plan  # noqa: E402
from runtimes.errors import BackendError, NonFiniteError, OutputError, UsageError  # noqa: E402
from runtimes.generator import Generator  # noqa: E402

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
