"""The backend registry: every backend in one ordered list, ``--backend auto`` walking it, one way to open one.

Each backend module declares its :class:`~runtimes.backends.base.BackendKind`
(``KIND``): its name, the engine format it runs, why it cannot run a
directory here, how it is built, and which options it takes.  Adding a
backend is its module and one line in :data:`REGISTRY`.  ``auto`` takes the
first kind of :data:`REGISTRY` that can run the directory on this machine
(the fastest first, as the benchmarks found); the torch backend, which runs
a checkpoint rather than engines, is never auto's choice for an engine
directory, and is the backend of a run without one.
"""

from __future__ import annotations

import logging
from os import PathLike
from pathlib import Path
from typing import Any

from lego_model.errors import checked_arguments
from runtimes.backends import openvino, ort, torch_backend, trt
from runtimes.backends.base import OPTION_FLAGS, Backend, BackendKind, BackendOptions
from runtimes.backends.decoding import attach_decoder
from runtimes.errors import BackendError, UsageError

log = logging.getLogger(__name__)

# Auto's order for an engine directory: GPU engines first, then the CPU backends by measured speed
# (OpenVINO was faster than ONNX Runtime on every CPU the benchmarks ran on), torch last (never auto's choice).
REGISTRY: tuple[BackendKind, ...] = (trt.KIND, ort.CUDA_KIND, openvino.KIND, ort.CPU_KIND, torch_backend.KIND)
BACKENDS: tuple[str, ...] = ("auto", *(kind.name for kind in REGISTRY))
_KINDS = {kind.name: kind for kind in REGISTRY}

__all__ = [
    "BACKENDS",
    "REGISTRY",
    "Backend",
    "BackendKind",
    "BackendOptions",
    "check_engine_dir_argument",
    "choose_backend",
    "open_backend",
]


def choose_backend(requested: str, problems: dict[str, str | None]) -> tuple[str, str]:
    """(backend, why) for ``--backend``, given why each engine backend cannot run the directory here.

    ``problems`` maps a backend name to its reason (None when it can run);
    names it lacks count as unusable.  ``auto`` takes the first usable kind
    in :data:`REGISTRY` order and says what it passed over.
    """
    if requested not in BACKENDS:
        raise BackendError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested, "requested"
    skipped = []
    for kind in REGISTRY:
        if kind.format is None:  # the torch backend: only when asked for
            continue
        problem = problems.get(kind.name, "not checked")
        if problem is None:
            return kind.name, "; ".join([*skipped, kind.chosen])
        skipped.append(f"{kind.name}: {problem}")
    raise BackendError(
        "the engine directory holds no engines this machine can run (" + "; ".join(skipped) + "); "
        "export ONNX files with lego-export --engines onnx, or use --backend torch"
    )


@checked_arguments
def check_engine_dir_argument(engine_dir: object) -> None:
    """Refuse an ``engine_dir`` that is not a path (None included: where a directory is required, an unset
    setting must not fall back to the shipped model's eager backend)."""
    if not isinstance(engine_dir, (str, PathLike)):
        hint = "; Generator.from_checkpoint() runs a checkpoint (None: the shipped model) without engines"
        got = type(engine_dir).__name__
        raise UsageError(f"engine_dir: expected a directory path, got {got}{hint if engine_dir is None else ''}")


def open_backend(
    requested: str = "auto", *, engine_dir: str | Path | None = None, **options: Any
) -> tuple[Backend, str]:
    """Build (not yet enter) the backend for a sampling run, and say why it was chosen.

    ``options`` are :class:`BackendOptions`'s fields (threads, precision,
    device, local_rank, ort_optimization, ort_arena, checkpoint, config,
    random_init, vae, vae_backend).  A latent model's backend gets its VAE
    decoder here too (:mod:`runtimes.backends.decoding`).  Without ``engine_dir`` the torch backend runs
    ``checkpoint`` (a file or a LegoModel), ``config`` with
    ``random_init``, or the shipped model.  The engine directory's manifest
    is read and verified once, here, and kept by the backend
    (``backend.manifest``).  Everything that can refuse (manifest checks,
    missing libraries or GPU, engines built for another GPU or TensorRT, a
    precision the backend cannot run, an option it would ignore) refuses
    here, before any compute.
    """
    opts = BackendOptions(**options)  # an unknown option, a wrong type or range: a UsageError naming it
    if engine_dir is not None:
        check_engine_dir_argument(engine_dir)
    if requested not in BACKENDS:
        raise BackendError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if engine_dir is None:
        if requested not in ("auto", "torch"):
            raise BackendError(
                f"--backend {requested} runs the engines of an engine directory: pass --engine-dir "
                "(only the torch backend samples without one)"
            )
        kind = torch_backend.KIND
        _check_options(kind, opts)
        backend = kind.build(None, None, opts)
        attach_decoder(backend, opts, kind.format)
        return backend, "requested" if requested == "torch" else "no --engine-dir: the eager model"
    if opts.random_init:
        raise BackendError("--random-init samples without engines: leave out --engine-dir, or leave out --random-init")

    from export.manifest import load_manifest

    manifest = load_manifest(engine_dir)
    if requested == "auto":
        problems = {kind.name: kind.problem(manifest, opts) for kind in REGISTRY if kind.format is not None}
        name, why = choose_backend("auto", problems)
    else:
        name, why = requested, "requested"
        problem = _KINDS[name].problem(manifest, opts)
        if problem is not None:
            raise BackendError(f"cannot use --backend {name}: {problem}")
    kind = _KINDS[name]
    _check_options(kind, opts)
    backend = kind.build(manifest, Path(engine_dir), opts)
    attach_decoder(backend, opts, kind.format)
    return backend, why


def _check_options(kind: BackendKind, opts: BackendOptions) -> None:
    """Refuse options ``kind`` would ignore (a --checkpoint for ONNX Runtime would be recorded but never read)."""
    unused = [name for name in opts.changed() if name not in kind.uses]
    if unused:
        name = unused[0]
        takers = [k.name for k in REGISTRY if name in k.uses]
        raise BackendError(
            f"{OPTION_FLAGS[name]} does not apply to the {kind.name} backend (it would be ignored); "
            f"it is an option of {', '.join(takers) or 'no backend'}: leave it out or choose that --backend"
        )
