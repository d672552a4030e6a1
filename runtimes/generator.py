"""One object per loaded model, one call per request: :class:`Generator`.

    from runtimes import Generator

    with Generator.from_engine_dir("engines/") as gen:         # or Generator.from_checkpoint(path or model)
        images = gen.generate(range(8), classes=3, size=(16, 32), plan="global@0.6", cfg_scale=2.0)

A generator owns a backend (its sessions, engines or model) and one brick
chain over it; ``generate`` takes any request -- seeds, classes, size, skip
plan, guidance, solver, steps, churn -- splits the seeds into batches the
engine profiles take, and returns the images, the same as the eager model's
for the same seeds (``lego_model.eager.sample_images``).  The sample CLI
(``python -m runtimes.sample``) is a shell over it.

Threads: one request at a time per generator.  ``generate`` holds the
generator's lock for the whole request, so concurrent calls from several
threads queue and each gets exactly the images it would get alone.  For
parallel requests build one generator per thread; generators may share a
backend (``Generator(backend)``), whose binding caches are keyed by the
buffers of each chain and locked.
"""

from __future__ import annotations

import math
import numbers
import operator
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from lego_model.checkpoints import load_checkpoint
from lego_model.images import to_uint8_nhwc
from lego_model.model import LegoModel
from lego_model.sampler import MAX_STEPS, SEED_RANGE, Solver, check_churn, draw_latents, edm_sample
from lego_model.shipped import shipped_checkpoint
from lego_model.skip import SkipPlan
from runtimes.backends import Backend, open_backend
from runtimes.chain import BrickChain
from runtimes.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

Output = Literal["tensor", "uint8", "pil"]
OUTPUTS = ("tensor", "uint8", "pil")
BATCH_CAP = 16  # default largest batch, where the engine profiles allow it


def default_batch(backend: Backend, guided: bool, cap: int = BATCH_CAP) -> int:
    """The largest batch up to ``cap`` that every engine's profile takes (guidance doubles the rows)."""
    max_rows = backend.max_rows()
    if max_rows is None:
        return cap
    return max(1, min(cap, max_rows // (2 if guided else 1)))


def make_randn_like(rnd, device: torch.device, churn: bool) -> Callable[[Tensor], Tensor]:
    """Per-seed noise for the sampler's churn, drawn on the CPU generators as the eager path does.

    Without churn the sampler multiplies the noise by 0, so zeros give the same
    images without drawing (and without a host-to-device copy per step).
    """
    if not churn:
        return torch.zeros_like
    if device.type == "cpu":
        return rnd.randn_like
    return lambda x: rnd.randn(x.shape, dtype=x.dtype).to(x.device, non_blocking=True)


class Generator:
    """A loaded model behind one backend; :meth:`generate` answers one request of any shape.

    Build it with :meth:`from_engine_dir` or :meth:`from_checkpoint` (or around
    a :class:`runtimes.Backend` of your own).  The backend loads on
    ``with generator:``, :meth:`load` or the first request, and is released by
    :meth:`close` (or the end of the ``with`` block).  A backend that is
    already loaded (``with backend:`` around several generators sharing it)
    stays the caller's: the generator neither loads nor closes it.  ``max_buffer_sets``
    bounds the per-(batch, size, guidance) buffer sets kept for reuse
    (:meth:`clear_buffers` drops them).  Thread-safe: requests are serialized
    by a lock (see the module docstring).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        cuda_graphs: bool = True,
        max_buffer_sets: int = 8,
        check_finite: bool = True,
        why: str = "given",
    ) -> None:
        self.backend = backend
        self.config = backend.config
        self.why = why
        self.chain = BrickChain(
            backend, cuda_graphs=cuda_graphs, check_finite=check_finite, max_buffer_sets=max_buffer_sets
        )
        self._lock = threading.RLock()
        self._state = "new"  # new -> loaded (or borrowed: the caller loaded the backend) -> closed

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_engine_dir(
        cls,
        engine_dir: str | Path,
        backend: str = "auto",
        *,
        threads: int | None = None,
        checkpoint: str | Path | None = None,
        device: str | torch.device | None = None,
        ort_optimization: str = "all",
        ort_arena: bool = True,
        local_rank: int = 0,
        cuda_graphs: bool = True,
        max_buffer_sets: int = 8,
    ) -> Generator:
        """A generator over an engine directory written by ``lego-export`` (manifest and hashes checked here).

        ``backend``: auto (TensorRT, else ONNX Runtime CUDA, else ONNX Runtime
        CPU), or one of ``runtimes.BACKENDS``; ``torch`` runs the checkpoint
        the manifest records (or ``checkpoint``) on ``device``.  ``threads``:
        ONNX Runtime's intra-op threads; ``ort_arena=False`` turns ONNX
        Runtime's CPU memory arena off (the system allocator serves it instead).
        """
        be, why = open_backend(
            backend,
            engine_dir=engine_dir,
            checkpoint=checkpoint,
            local_rank=local_rank,
            threads=threads,
            ort_optimization=ort_optimization,
            ort_arena=ort_arena,
            device=device,
        )
        return cls(be, cuda_graphs=cuda_graphs, max_buffer_sets=max_buffer_sets, why=why)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | LegoModel | None = None,
        *,
        config: str | None = None,
        device: str | torch.device | None = None,
        cuda_graphs: bool = True,
        max_buffer_sets: int = 8,
    ) -> Generator:
        """A generator running the eager model (torch backend) of a checkpoint file or a LegoModel.

        ``checkpoint``: a file ``load_checkpoint`` reads (``config`` names the
        registry config of a plain state dict), a LegoModel (never modified:
        a copy moves to ``device`` when it is elsewhere), or None for the
        shipped model.  ``device``: "cpu", "cuda", "cuda:1" (default: the GPU
        when torch sees one).
        """
        from runtimes.backends.torch_backend import TorchBackend

        if isinstance(checkpoint, LegoModel):
            model, why = checkpoint, "a LegoModel"
        else:
            path = shipped_checkpoint() if checkpoint is None else checkpoint
            model, why = load_checkpoint(path, config), f"weights from {path}"
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(
            TorchBackend(model, device=device), cuda_graphs=cuda_graphs, max_buffer_sets=max_buffer_sets, why=why
        )

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> Generator:
        """Load the backend (sessions, engines, model) now rather than at the first request."""
        with self._lock:
            if self._state == "closed":
                raise UsageError("this Generator is closed; build a new one")
            if self._state == "new" and self.backend.loaded:
                self._state = "borrowed"
            elif self._state == "new":
                self.backend.__enter__()
                self._state = "loaded"
        return self

    def close(self) -> None:
        """Release the backend and every buffer set; the generator cannot be used afterwards."""
        with self._lock:
            if self._state in ("loaded", "borrowed"):
                self.chain.clear()
            if self._state == "loaded":
                self.backend.__exit__(None, None, None)
            self._state = "closed"

    def __enter__(self) -> Generator:
        return self.load()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def clear_buffers(self) -> None:
        """Drop the buffer sets (and CUDA graphs) kept for reuse; the next request allocates afresh."""
        with self._lock:
            self.chain.clear()

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def max_batch(self, guided: bool = False, cap: int = BATCH_CAP) -> int:
        """The largest batch (images, not rows) up to ``cap`` a request is split into by default."""
        return default_batch(self.backend, guided, cap)

    # ------------------------------------------------------------------ requests
    def generate(
        self,
        seeds: int | Iterable[int],
        classes: int | Sequence[int] | None = None,
        size: int | tuple[int, int] | None = None,
        plan: SkipPlan | str | Sequence[str] | None = None,
        cfg_scale: float | None = None,
        steps: int = 18,
        solver: Solver = "heun",
        *,
        S_churn: float = 0.0,
        S_min: float = 0.0,
        S_max: float = math.inf,
        S_noise: float = 1.0,
        batch: int | None = None,
        output: Output = "tensor",
        on_step: Callable[[int], None] | None = None,
    ) -> Tensor | np.ndarray | list[Any]:
        """Sample one image per seed; every argument is checked before any compute.

        seeds: ints in [0, 2**32) (a range works; one int is one image).
        classes: None (a random class per seed, as the authors draw it), one
        class for all, or one class per seed.  size: (height, width) or one
        side (default: the training resolution).  plan: a SkipPlan, rule or
        preset text (``"2@0.6:1"``, ``"global@0.6"``, a list of them), or None
        for the full stack.  cfg_scale: classifier-free guidance scale or None.
        batch: images per engine batch (default: up to 16, as the profiles
        take); results do not depend on it.  output: ``"tensor"`` (float64
        [N, C, H, W] in [-1, 1], on the backend's device), ``"uint8"`` (numpy
        [N, H, W, C]) or ``"pil"`` (a list of PIL images).  on_step(i) is
        called after each sampling step of each batch.
        """
        req = self._request(seeds, classes, size, plan, cfg_scale, steps, solver, batch, output,
                            dict(S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise))  # fmt: skip
        with self._lock:
            self.load()
            images = torch.cat([self._batch(req, chunk, on_step) for chunk in req.chunks])
        return _convert(images, req.output)

    def check(
        self,
        seeds: int | Iterable[int],
        classes: int | Sequence[int] | None = None,
        size: int | tuple[int, int] | None = None,
        plan: SkipPlan | str | Sequence[str] | None = None,
        cfg_scale: float | None = None,
        steps: int = 18,
        solver: Solver = "heun",
        *,
        S_churn: float = 0.0,
        S_min: float = 0.0,
        S_max: float = math.inf,
        S_noise: float = 1.0,
        batch: int | None = None,
        output: Output = "tensor",
    ) -> None:
        """Raise what :meth:`generate` would refuse for these arguments, without loading or computing anything."""
        self._request(seeds, classes, size, plan, cfg_scale, steps, solver, batch, output,
                      dict(S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise))  # fmt: skip

    def _request(self, seeds, classes, size, plan, cfg_scale, steps, solver, batch, output, churn) -> _Request:
        """Every refusal of a request, before any compute; the request, normalised."""
        cfg = self.config
        for name, value in churn.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"{name} must be a number, got {value!r}")
        churn = {k: float(v) for k, v in churn.items()}
        check_churn(**churn)  # the ranges, as the CLIs check them
        if self._state == "closed":
            raise UsageError("this Generator is closed; build a new one")
        seeds_expected = "ints in [0, 2**32)"
        if _is_int(seeds):
            seed_list = [_as_int(seeds, "seeds", seeds_expected)]
        else:
            seed_list = [_as_int(s, "seeds", seeds_expected) for s in _as_list(seeds, "seeds", seeds_expected)]
        if not seed_list:
            raise UsageError("seeds: pass at least one seed")
        for s in seed_list:
            if not 0 <= s < SEED_RANGE:
                raise UsageError(f"seeds: expected {seeds_expected}, got {s!r}")
        class_expected = f"ints in [0, {cfg.label_dim})"
        if _is_int(classes):
            classes = _as_int(classes, "classes", class_expected)
        elif classes is not None:
            classes = [_as_int(c, "classes", class_expected) for c in _as_list(classes, "classes", class_expected)]
            if len(classes) != len(seed_list):
                raise UsageError(
                    f"classes: {len(classes)} given for {len(seed_list)} seeds; pass one per seed or one int"
                )
        for c in classes if isinstance(classes, list) else [classes]:
            cfg.check_class(c)
        size_expected = "(height, width) ints or one int"
        if size is None:
            height = width = cfg.resolution
        elif _is_int(size):
            height = width = _as_int(size, "size", size_expected)
        else:
            sides = _as_list(size, "size", size_expected)
            if len(sides) != 2:
                raise UsageError(f"size: expected {size_expected}, got {size!r}")
            height, width = (_as_int(v, "size", size_expected) for v in sides)
        cfg.check_image_size(height, width)
        if cfg_scale is not None:
            if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, numbers.Real) or not math.isfinite(cfg_scale):
                raise UsageError(f"cfg_scale must be a finite number or None, got {cfg_scale!r}")
            cfg_scale = float(cfg_scale)
        cfg.check_guidance(cfg_scale)
        if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
            raise UsageError(f"steps must be an int in 1..{MAX_STEPS}, got {steps!r}")
        steps = int(steps)
        if solver not in ("heun", "euler"):
            raise UsageError(f"solver must be 'heun' or 'euler', got {solver!r}")
        if output not in OUTPUTS:
            raise UsageError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        skip = SkipPlan.of(plan, cfg)
        guided = cfg_scale is not None
        size_b = self.max_batch(guided) if batch is None else batch
        if not _is_int(size_b) or size_b < 1:
            raise UsageError(f"batch must be a positive int, got {batch!r}")
        size_b = int(size_b)
        chunks = [seed_list[i : i + size_b] for i in range(0, len(seed_list), size_b)]
        for n in sorted({len(c) for c in chunks}):
            self.chain.check(n, height, width, cfg_scale)  # the engines' profile ranges
        per_seed = classes if isinstance(classes, list) else None
        return _Request(
            chunks=[
                (c, per_seed[i * size_b : i * size_b + len(c)] if per_seed else classes) for i, c in enumerate(chunks)
            ],
            height=height,
            width=width,
            cfg_scale=None if cfg_scale is None else float(cfg_scale),
            steps=steps,
            solver=solver,
            active=skip.steps(steps),  # refuses a plan that leaves a step without bricks
            output=output,
            churn=churn,
        )

    def _batch(self, req: _Request, chunk, on_step) -> Tensor:
        seeds, classes = chunk
        cfg, device = self.config, self.backend.device
        latents, labels, rnd = draw_latents(seeds, cfg.img_channels, req.height, req.width, cfg.label_dim, classes)
        with self.chain.batch(
            labels,
            batch=len(seeds),
            height=req.height,
            width=req.width,
            cfg_scale=req.cfg_scale,
            num_steps=req.steps,
            solver=req.solver,
        ) as denoise:
            return edm_sample(
                denoise,
                latents.to(device),
                num_steps=req.steps,
                solver=req.solver,
                randn_like=make_randn_like(rnd, device, req.churn["S_churn"] > 0),
                active_per_step=req.active,
                on_step=on_step,
                **req.churn,
            )


@dataclass(frozen=True)
class _Request:
    """A checked request: seed chunks (each with its classes), size, guidance, steps, per-step brick sets."""

    chunks: list[tuple[list[int], int | list[int] | None]]
    height: int
    width: int
    cfg_scale: float | None
    steps: int
    solver: Solver
    active: list[tuple[int, ...]]
    output: Output
    churn: dict[str, float]


def _is_int(value: object) -> bool:
    """An integer (Python, numpy or a 0-dim integer tensor), not a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, Tensor):
        return value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _as_int(value: object, name: str, expected: str) -> int:
    if not _is_int(value):
        raise UsageError(f"{name}: expected {expected}, got {value!r}")
    return operator.index(value)


def _as_list(value: object, name: str, expected: str) -> list:
    if isinstance(value, (str, bytes)):
        raise UsageError(f"{name}: expected {expected}, got {value!r}")
    try:
        return list(value)
    except TypeError:
        raise UsageError(f"{name}: expected {expected}, got {value!r}") from None


def _convert(images: Tensor, output: Output) -> Tensor | np.ndarray | list[Any]:
    if output == "tensor":
        return images
    arr = to_uint8_nhwc(images)
    if output == "uint8":
        return arr
    from PIL import Image

    return [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in arr]
