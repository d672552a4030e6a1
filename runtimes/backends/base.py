"""The interface every backend implements, and the pure helpers they share.

A backend runs one engine ("embedder", "brick0", "brick1", ...) on tensors the
brick chain owns.  Lifecycle, as Polygraphy's runners::

    with SomeBackend(...) as backend:           # load: sessions / engines / model, once
        backend.infer(call, inputs, outputs)     # per engine call, on the caller's buffers

``inputs`` and ``outputs`` map the engine's tensor names (DESIGN.md, "Engine
contract") to torch tensors of the caller (a chain's buffers).  Whatever a
backend derives from them (ONNX Runtime I/O bindings, TensorRT input shapes)
it caches keyed by the buffers themselves -- data pointer, shape and dtype of
every tensor (:func:`buffers_key`) -- in a bounded cache it owns, so any
number of chains, and callers with tensors of their own, may share one
backend: handed other buffers, it rebinds.  Nothing is keyed by the call
alone, and no caller tells a backend when to rebind.

Threads: ``infer`` may be called from several threads on distinct buffers
(the binding cache is locked; ONNX Runtime's ``run`` is thread-safe); one set
of buffers must not be used by two threads at once, which the chain ensures
with its own lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, fields
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from export.loaders import OPTIMIZATIONS, onnx_weights
from export.records import TORCH_DTYPES
from lego_model.configs import LegoConfig
from lego_model.errors import checked_arguments
from lego_model.flops import usable_cores
from lego_model.model import LegoModel
from lego_model.vae import Vae
from runtimes.backends.precision import INT8, PRECISIONS, files_precision, resolve_precision
from runtimes.cuda import TORCH_CUDA, Cuda
from runtimes.distributed import rank_info
from runtimes.errors import BackendError, UsageError

if TYPE_CHECKING:
    from export.records import EngineEntry, Manifest, Profile


@dataclass(frozen=True)
class EngineCall:
    """One engine run inside a denoiser call: which engine, where f_prev comes from, where the output goes.

    ``src`` is None for engines without ``f_prev`` (the embedder, brick 0),
    ``"zeros"`` for the first active brick when brick 0 is skipped, else the
    ping-pong buffer ``"f0"``/``"f1"`` the previous active brick wrote.  It
    names the slots of a chain's buffer set, not the tensors: a backend keys
    its bindings by the tensors it is handed (:func:`buffers_key`).
    """

    engine: str
    brick: int | None
    src: str | None
    dst: str


# The decoder of a latent model's latents, run through ``infer`` as every other engine: latents -> images.
VAE_CALL = EngineCall("vae_decoder", None, None, "images")


def buffers_key(engine: str, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> Hashable:
    """What a binding of ``engine`` to these tensors depends on: per tensor its name, data pointer, shape, dtype.

    Two calls with equal keys may share a binding (it points at the same
    memory, read as the same shape and dtype); any other change of buffers
    gives another key, hence a new binding.
    """
    return (
        engine,
        tuple((n, t.data_ptr(), tuple(t.shape), t.dtype, t.device) for n, t in inputs.items()),
        tuple((n, t.data_ptr(), tuple(t.shape), t.dtype, t.device) for n, t in outputs.items()),
    )


class BindingCache:
    """A bounded, locked LRU cache of bindings by :func:`buffers_key`; ``get(key, make)`` builds on a miss.

    Bounded because callers' buffers come and go (a chain evicts buffer sets,
    callers pass tensors of their own): a binding whose buffers were freed is
    only ever reused by buffers with the same pointer, shape and dtype, for
    which it is exactly right, and the oldest are dropped past ``size``.
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, make: Callable[[], object]) -> object:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
            found = self._items[key] = make()
            self.misses += 1
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return found

    def keys(self) -> list[Hashable]:
        """The cached keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


@dataclass(frozen=True)
class BufferDtypes:
    """dtype of each tensor the chain allocates, as the engines want them."""

    c_noise: torch.dtype = torch.float32
    class_labels: torch.dtype = torch.float32
    cond: torch.dtype = torch.float32
    x_in: torch.dtype = torch.float32
    f: torch.dtype = torch.float32


def buffer_dtypes(entries: Mapping[str, EngineEntry]) -> BufferDtypes:
    """Buffer dtypes read from the engines' I/O specs; refuses engines that disagree about a shared tensor.

    ``cond`` is written by the embedder and read by every brick, and ``f`` is
    written by brick k and read as ``f_prev`` by the next active brick, so each
    must have one dtype across all engines.
    """
    seen: dict[str, set[str]] = {}
    for entry in entries.values():
        for spec in [*entry.inputs, *entry.outputs]:
            key = "f" if spec.name == "f_prev" else spec.name
            seen.setdefault(key, set()).add(spec.dtype)
    for key, kinds in seen.items():
        if len(kinds) > 1:
            raise BackendError(
                f"engines disagree on the dtype of {key!r} ({', '.join(sorted(kinds))}); "
                "re-export all engines with one --precision"
            )
    fields = BufferDtypes.__dataclass_fields__
    return BufferDtypes(**{k: TORCH_DTYPES[next(iter(v))] for k, v in seen.items() if k in fields})


def check_engine_set(entries: Mapping[str, EngineEntry], config: LegoConfig, fmt: str) -> None:
    """Refuse a directory that lacks the embedder or a brick in the requested format."""
    needed = ["embedder", *(f"brick{k}" for k in range(config.num_bricks))]
    missing = [n for n in needed if n not in entries]
    if missing:
        raise BackendError(
            f"the engine directory has no {fmt} engine for {', '.join(missing)}; "
            f"export them with lego-export --engines {'trt' if fmt == 'tensorrt' else 'onnx'}"
        )


@checked_arguments
@dataclass(frozen=True)
class BackendOptions:
    """What a user chooses about a backend: the sample CLI's options and the Python API's keywords, in one place.

    Every field has the default a user who says nothing gets.  A backend
    uses some of them (:attr:`BackendKind.uses`); a field set to anything but
    its default for a backend that does not use it is refused
    (:meth:`BackendKind.check_options`), so that no option is silently ignored.
    """

    threads: int | None = None  # intra-op threads of the CPU backends (default: the usable cores)
    # auto, fp32, bf16: chosen at load by OpenVINO and torch, the others check their files; int8: int8 files only
    precision: str = "auto"
    device: str | Any | None = None  # where the torch backend runs ("cpu", "cuda:1"); engine backends run theirs
    local_rank: int = 0  # the GPU of this torchrun rank
    ort_optimization: str = "all"  # ONNX Runtime graph optimizations
    ort_arena: bool = True  # ONNX Runtime's CPU memory arena
    checkpoint: Any = None  # torch backend: a checkpoint file or a LegoModel instead of the manifest's weights
    config: str | None = None  # torch backend: the registry config of a checkpoint that carries none
    random_init: bool = False  # torch backend without engines: random weights (seed 0) of ``config``
    vae: Any = None  # latent models: decode with diffusers' eager VAE from this path (or a lego_model.vae.Vae)
    vae_backend: str = "engine"  # latent models: "engine" (the directory's vae_decoder) or "torch" (diffusers eager)

    def __post_init__(self) -> None:
        # The types and ranges of the sample CLI's options, checked here for the Python API (open_backend, the
        # Generator) with the same bounds: --threads 1..usable_cores, the --precision and --ort-optimization choices.
        if self.threads is not None:
            check_threads(self.threads)
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.ort_optimization not in OPTIMIZATIONS:
            raise UsageError(
                f"ort_optimization: expected one of {', '.join(OPTIMIZATIONS)}, got {self.ort_optimization!r}"
            )
        for name in ("ort_arena", "random_init"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if isinstance(self.local_rank, bool) or not isinstance(self.local_rank, int) or self.local_rank < 0:
            raise UsageError(f"local_rank: expected an int >= 0 (torchrun's LOCAL_RANK), got {self.local_rank!r}")
        if self.device is not None and not isinstance(self.device, (str, torch.device)):
            raise UsageError(f"device: expected 'cpu', 'cuda', 'cuda:N' or a torch.device, got {self.device!r}")
        if self.config is not None and not isinstance(self.config, str):
            raise UsageError(f"config: expected a registry config name (str), got {self.config!r}")
        if self.checkpoint is not None and not isinstance(self.checkpoint, (str, PathLike, LegoModel)):
            raise UsageError(f"checkpoint: expected a file path or a LegoModel, got {type(self.checkpoint).__name__}")
        if self.vae is not None and not isinstance(self.vae, (str, PathLike, Vae)):
            raise UsageError(f"vae: expected a path or a lego_model.vae.Vae, got {type(self.vae).__name__}")

    def changed(self) -> list[str]:
        """The fields a user set to something other than the default (not local_rank: torchrun sets it)."""
        default = BackendOptions()
        return [
            f.name for f in fields(self) if f.name != "local_rank" and getattr(self, f.name) != getattr(default, f.name)
        ]


# How each option is spelled on the command line (for refusals that name it).
OPTION_FLAGS = {
    "threads": "--threads",
    "precision": "--precision",
    "device": "device=",
    "local_rank": "LOCAL_RANK",
    "ort_optimization": "--ort-optimization",
    "ort_arena": "ort_arena=",
    "checkpoint": "--checkpoint",
    "config": "--config",
    "random_init": "--random-init",
    "vae": "--vae",
    "vae_backend": "--vae-backend",
}
# Every backend decodes a latent model's latents (its own vae_decoder engine, or diffusers' eager decoder).
DECODER_OPTIONS = frozenset({"vae", "vae_backend"})


@dataclass(frozen=True)
class BackendKind:
    """One entry of the backend registry: a backend's name, what it runs, whether it can run here, how it is built.

    ``format`` is the engine format it runs ("onnx", "tensorrt"), or None for
    the torch backend, which runs a checkpoint.  ``problem(manifest, options)``
    says why it cannot run that engine directory on this machine (a missing
    library, GPU or engine format), or None when it can; it imports heavy
    libraries lazily.  ``build(manifest, engine_dir, options)`` makes the
    backend (not yet loaded: ``with backend:`` loads it) and refuses what only
    building can find.  ``uses`` names the :class:`BackendOptions` fields it
    reads; ``chosen`` is what ``--backend auto`` says when it picks it.
    """

    name: str
    format: str | None
    problem: Callable[[Manifest, BackendOptions], str | None]
    build: Callable[[Manifest | None, Path | None, BackendOptions], Backend]
    uses: frozenset[str]
    chosen: str


class Backend:
    """One way of running the embedder and brick engines; subclasses fill in the hooks below."""

    name: str = "backend"
    precision: str = "fp32"
    precision_why: str = "the precision the engines were exported in"
    supports_cuda_graphs: bool = False
    cuda: Cuda = TORCH_CUDA  # the CUDA calls of this backend, its chains and their graphs (a fake in tests)
    manifest: Manifest | None = None  # the verified manifest of the engine directory it was opened on
    weights: str = "unknown"  # what computes the pixels: "sha256:<checkpoint>", "random init seed 0", ...
    # A latent model's decoder (runtimes.backends.decoding.attach_decoder): this backend's own vae_decoder
    # engine, or diffusers' eager decoder; neither: it samples latents only.
    decoder_entry: EngineEntry | None = None
    vae: Vae | None = None

    def __init__(self, config: LegoConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.dtypes = BufferDtypes()
        self.loaded = False
        self.generation = 0  # loads so far: CUDA graphs captured under an earlier load point at released engines
        self._vae_module: torch.nn.Module | None = None  # the eager decoder on the device, once loaded

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> Backend:
        self.load()
        self.loaded = True
        self.generation += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.loaded = False
        self.close()

    @property
    def shares_results(self) -> bool:
        """Whether this backend's images equal every other backend's at its precision to rounding: at fp32 the
        backends agree to one uint8 level (the parity tests); bf16, fp16 and int8 results are each backend's own
        (OpenVINO and torch bf16 differed by up to 29/255 on 44% of the pixels), so a run records the backend."""
        return self.precision == "fp32"

    def require_loaded(self) -> None:
        """Refuse engine calls before ``with backend:`` loaded it (or after it closed)."""
        if not self.loaded:
            raise UsageError(
                f"the {self.name} backend is not loaded: run engines inside `with backend:` "
                "(or use runtimes.Generator, which loads its backend)"
            )

    def load(self) -> None:
        """Create sessions / engines / model; called once by ``__enter__``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what :meth:`load` created."""
        raise NotImplementedError

    # ---------------------------------------------------------------- per shape / per call
    def check_shape(self, rows: int, height: int, width: int) -> None:
        """Raise a ShapeError naming the supported range when an engine cannot take this shape."""
        self.config.check_image_size(height, width)

    def max_rows(self) -> int | None:
        """Largest batch (in engine rows) every engine takes; None when unlimited."""
        return None

    # ---------------------------------------------------------------- the VAE decoder (latent models)
    @property
    def has_decoder(self) -> bool:
        return self.decoder_entry is not None or self.vae is not None

    def decoder_name(self) -> str | None:
        """What decodes (for the run's summary), or None."""
        if self.vae is not None:
            return f"torch (diffusers AutoencoderKL on {self.device})"
        if self.decoder_entry is not None:
            return f"{self.name} ({self.decoder_entry.file})"
        return None

    def decoder_profile(self) -> Profile | None:
        """The batch and latent-size ranges of the vae_decoder engine (None: eager, any size)."""
        return self.decoder_entry.profile if self.vae is None and self.decoder_entry is not None else None

    def _load_vae(self) -> None:
        """Put the eager decoder on this backend's device (part of :meth:`load` where there is one)."""
        if self.vae is not None:
            self._vae_module = self.vae.decoder().to(self.device)

    def decodes_eagerly(self, call: EngineCall) -> bool:
        """Whether ``call`` is the vae_decoder and diffusers' eager decoder runs it (every backend's infer asks)."""
        return call.engine == VAE_CALL.engine and self.vae is not None

    def _eager_decode(self, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> None:
        """The eager decoder's images into ``outputs["images"]`` (diffusers' own decode; fp32 whatever else runs)."""
        with torch.no_grad():
            outputs["images"].copy_(self._vae_module(inputs["latents"].float()))

    def engine_weights(self, engine: str) -> torch.nn.Module | Iterable[tuple[str, Any]] | None:
        """The weights engine ``engine`` ("embedder", "brick1") computes with, read for a NaN/Inf report only;
        None where this backend cannot read them (:func:`lego_model.eager.nonfinite_cause` then says so)."""
        return None

    def infer(self, call: EngineCall, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> None:
        """Run engine ``call.engine`` reading ``inputs`` and writing into ``outputs`` (no allocation of I/O).

        Any tensors may be handed (contiguous, on :attr:`device`, of the
        engine's dtypes); the backend rebinds when they differ from the last
        ones it bound for this engine.  Call it inside ``with backend:``.
        """
        raise NotImplementedError


class EngineBackend(Backend):
    """A backend of exported engines (``entries``, by engine name): shapes are bounded by their profiles.

    Built on a verified manifest (``load_manifest``), of which it runs the
    engines of one ``format``; refuses a directory that lacks one of them.
    """

    entries: Mapping[str, EngineEntry]

    def __init__(self, manifest: Manifest, engine_dir: str | Path, fmt: str, device: torch.device) -> None:
        super().__init__(manifest.config, device)
        self.manifest = manifest
        self.engine_dir = Path(engine_dir)
        self.entries = manifest.engines_for(fmt)
        check_engine_set(self.entries, manifest.config, fmt)
        self.dtypes = buffer_dtypes(self.entries)
        self.precision = files_precision(self.entries)
        self.weights = manifest_weights(manifest)

    def check_shape(self, rows: int, height: int, width: int) -> None:
        super().check_shape(rows, height, width)
        for entry in self.entries.values():
            entry.profile.check(rows, height, width)

    def max_rows(self) -> int | None:
        return min(e.profile.batch[2] for e in self.entries.values())

    def engine_weights(self, engine: str) -> Iterable[tuple[str, Any]] | None:
        """The initializers of the engine's ONNX file (a TensorRT plan's weights cannot be read back)."""
        entry = self.entries.get(engine)
        if entry is None or entry.format != "onnx":
            return None
        try:
            return onnx_weights(entry.path(self.engine_dir))
        except OSError:  # removed since it was verified: the report says the weights could not be read
            return None

    def engines_to_load(self) -> dict[str, EngineEntry]:
        """The embedder and bricks, and the vae_decoder when this backend runs its own."""
        extra = {self.decoder_entry.name: self.decoder_entry} if self.decoder_entry is not None and not self.vae else {}
        return {**self.entries, **extra}


def default_threads(local_world_size: int | None = None) -> int:
    """CPU threads per process: the cores this process may use, shared among the processes of one machine.

    ``local_world_size`` defaults to torchrun's LOCAL_WORLD_SIZE (1 outside
    torchrun).  Oversubscribing (ORT's default of one thread per physical core
    in every torchrun worker) makes the workers fight for the same cores.
    """
    if local_world_size is None:
        local_world_size = rank_info().local_world_size
    return max(1, usable_cores() // max(1, local_world_size))


def check_threads(threads: object) -> None:
    """Refuse what is not an int from 1 to the cores this process has (more only contend, and 100000 exhaust the
    OS): the range of the sample CLI's ``--threads``, both read from :func:`lego_model.flops.usable_cores`."""
    cores = usable_cores()
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise UsageError(f"threads (--threads): expected an int in 1..{cores}, got {threads!r}")
    if not 1 <= threads <= cores:
        raise BackendError(
            f"--threads {threads} is outside 1..{cores}, the cores this process may use; pass at most {cores}"
        )


def manifest_weights(manifest: Manifest) -> str:
    """What computes an engine directory's pixels: its checkpoint's sha256, or the random-init seed."""
    record = manifest.checkpoint
    return (
        f"random init seed {record.random_init_seed}"
        if record.random_init_seed is not None
        else f"sha256:{record.sha256}"
    )


def check_file_precision(backend: str, precision: str, entries: Mapping[str, EngineEntry]) -> None:
    """Refuse a --precision other than the files' own for backends that run the files as exported.

    The files' precision is :func:`runtimes.backends.precision.files_precision`: an int8 export (int8 bricks,
    fp32 embedder) is int8.
    """
    if precision == "auto":
        return
    kinds = files_precision(entries)
    if kinds == precision:
        return
    if INT8 in (kinds, precision):
        # int8 is the files' precision for every backend (OpenVINO and torch included): resolve_precision's
        # refusal, which offers the export or the precision that fits, is the one wording
        resolve_precision(precision, torch.device("cpu"), files=kinds)
    raise BackendError(
        f"{backend} runs the precision the engines were exported in ({kinds}), not {precision}; "
        f"use --backend openvino or torch for {precision} at run time, or re-export with --precision {precision}"
    )
