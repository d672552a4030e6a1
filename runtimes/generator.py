"""One object per loaded model, one call per request: :class:`Generator`.

    from runtimes import Generator

    with Generator.from_engine_dir("engines/") as gen:         # or Generator.from_checkpoint(path or model)
        images = gen.generate(range(8), classes=3, size=(16, 32), plan="global@0.6", cfg_scale=2.0)

A generator owns a backend (its sessions, engines or model) and one brick
chain over it; ``generate`` takes one :class:`lego_model.request.Request` --
or the keywords that build one -- splits its seeds into batches the engine
profiles take, and returns the images, the same as the eager model's for the
same seeds (``lego_model.eager.sample``).  The sample CLI
(``python -m runtimes.sample``) is a shell over it.

Threads: one request at a time per generator.  ``generate`` holds the
generator's lock for the whole request, so concurrent calls from several
threads queue and each gets exactly the images it would get alone.  For
parallel requests build one generator per thread; generators may share a
backend (``Generator(backend)``), whose binding caches are keyed by the
buffers of each chain and locked.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from export.records import VAE_UPSCALE
from lego_model.errors import checked_arguments
from lego_model.images import as_output
from lego_model.model import LegoModel
from lego_model.request import Request, check_on_step, concat_batches, sample_batches
from lego_model.vae import DECODE_BUDGET_BYTES, NO_VAE_HINT, decode_chunk
from runtimes.backends import Backend, check_engine_dir_argument, open_backend
from runtimes.backends.base import VAE_CALL
from runtimes.backends.decoding import decoder_architecture
from runtimes.chain import BrickChain
from runtimes.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

BATCH_CAP = 16  # default largest batch, where the engine profiles allow it


def default_batch(backend: Backend, guided: bool, cap: int = BATCH_CAP) -> int:
    """The largest batch up to ``cap`` that every engine's profile takes (guidance doubles the rows)."""
    max_rows = backend.max_rows()
    if max_rows is None:
        return cap
    return max(1, min(cap, max_rows // (2 if guided else 1)))


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

    @checked_arguments
    def __init__(
        self,
        backend: Backend,
        *,
        cuda_graphs: bool = True,
        max_buffer_sets: int = 8,
        check_finite: bool = True,
        why: str = "given",
    ) -> None:
        self.chain = BrickChain(  # first: it refuses what is not a backend, and flags or bounds of other types
            backend, cuda_graphs=cuda_graphs, check_finite=check_finite, max_buffer_sets=max_buffer_sets
        )
        self.backend = backend
        self.config = backend.config
        self.why = why
        self._lock = threading.RLock()
        self._decoding: dict[tuple[int, int, int], tuple[dict[str, Tensor], dict[str, Tensor]]] = {}
        self._state = "new"  # new -> loaded (or borrowed: the caller loaded the backend) -> closed

    # ------------------------------------------------------------------ construction
    @classmethod
    @checked_arguments
    def from_engine_dir(
        cls,
        engine_dir: str | Path,
        backend: str = "auto",
        *,
        cuda_graphs: bool = True,
        max_buffer_sets: int = 8,
        **options: Any,
    ) -> Generator:
        """A generator over an engine directory written by ``lego-export`` (manifest and hashes checked here).

        ``backend``: auto (TensorRT, else ONNX Runtime CUDA, else OpenVINO,
        else ONNX Runtime CPU), or one of ``runtimes.BACKENDS``; ``torch`` runs
        the checkpoint the manifest records (or ``checkpoint=``).  ``options``
        are the sample CLI's backend options (:class:`runtimes.backends.BackendOptions`):
        ``threads``, ``precision`` (auto, fp32, bf16; int8 for int8 files), ``device`` and
        ``checkpoint``/``config`` (torch backend), ``ort_optimization``,
        ``ort_arena`` (ONNX Runtime), ``local_rank``, and for latent models
        ``vae`` (decode with diffusers' eager decoder from this path) and
        ``vae_backend`` ("engine": the directory's vae_decoder, "torch");
        one a backend would ignore is refused.
        """
        check_engine_dir_argument(engine_dir)  # None too: open_backend would run the shipped model eagerly
        be, why = open_backend(backend, engine_dir=engine_dir, **options)
        return cls(be, cuda_graphs=cuda_graphs, max_buffer_sets=max_buffer_sets, why=why)

    @classmethod
    @checked_arguments
    def from_checkpoint(
        cls,
        checkpoint: str | Path | LegoModel | None = None,
        *,
        cuda_graphs: bool = True,
        max_buffer_sets: int = 8,
        **options: Any,
    ) -> Generator:
        """A generator running the eager model (torch backend) of a checkpoint file or a LegoModel.

        ``checkpoint``: a file ``load_checkpoint`` reads (``config=`` names the
        registry config of a plain state dict), a LegoModel (never modified:
        a copy moves to ``device`` when it is elsewhere), or None for the
        shipped model.  ``options``: ``device`` ("cpu", "cuda", "cuda:1";
        default the GPU when torch sees one), ``precision`` (fp32, bf16),
        ``config``, ``random_init`` (with ``config``), ``threads``, and for a
        latent model ``vae`` (a diffusers AutoencoderKL path or a
        ``lego_model.vae.Vae``), which its requests decode with.
        """
        be, why = open_backend("torch", checkpoint=checkpoint, **options)
        return cls(be, cuda_graphs=cuda_graphs, max_buffer_sets=max_buffer_sets, why=why)

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> Generator:
        """Load the backend (sessions, engines, model) now rather than at the first request."""
        with self._lock:
            self._refuse_closed()
            if self._state == "borrowed" and not self.backend.loaded:
                raise UsageError(
                    "the backend this Generator shares was closed by the one that loaded it: load a shared backend "
                    "yourself (Generator(backend) inside `with backend:`), or build a new Generator"
                )
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
                self._decoding.clear()
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

    @checked_arguments
    def max_batch(self, guided: bool = False, cap: int = BATCH_CAP) -> int:
        """The largest batch (images, not rows) up to ``cap`` a request is split into by default."""
        if not isinstance(guided, bool):
            raise UsageError(f"guided: expected True or False, got {guided!r}")
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise UsageError(f"cap: expected an int >= 1 (images per batch), got {cap!r}")
        return default_batch(self.backend, guided, cap)

    def _refuse_closed(self) -> None:
        if self._state == "closed":
            raise UsageError("this Generator is closed; build a new one")

    # ------------------------------------------------------------------ requests
    @checked_arguments
    def request(self, seeds: int | Iterable[int], **kwargs: Any) -> Request:
        """A :class:`Request` for this generator's model: ``Request.make(self.config, seeds, **kwargs)``."""
        return Request.make(self.config, seeds, **kwargs)

    @checked_arguments
    def check(self, request: Request) -> None:
        """Raise what :meth:`generate` would refuse for ``request`` on this backend, without loading anything.

        The request checked itself when it was built; here come the backend's
        limits: every batch size it splits into against the engine profiles.
        """
        self._refuse_closed()
        if not isinstance(request, Request):
            raise UsageError(f"expected a Request (gen.request(seeds, ...)), got {type(request).__name__}")
        if request.config != self.config:
            raise UsageError(
                f"the request was built for {request.config.name}, this generator runs {self.config.name}; "
                "build it with gen.request(...)"
            )
        sizes = request.batch_sizes(self.max_batch(request.guided))
        for n in sizes:
            # The request checked its guidance and size itself; what is left is the engines' profiles.
            self.backend.check_shape(2 * n if request.guided else n, request.height, request.width)
        if self.config.is_latent and request.output != "latents":
            self._check_decoder(request.height, request.width)
        if self.device.type == "cpu":  # host memory: the torch backend has no profile to bound a batch
            request.check_memory(self.max_batch(request.guided))

    @checked_arguments
    def generate(
        self,
        seeds: Request | int | Iterable[int],
        *,
        on_step: Callable[[int], None] | None = None,
        **kwargs: Any,
    ) -> Tensor | np.ndarray | list[Any]:
        """Sample one image per seed of a request; everything is checked before any compute.

        ``seeds``: a :class:`Request` (``gen.request(...)``), or the seeds of
        one, followed by the keywords of :meth:`Request.make` (classes, size,
        plan, cfg_scale, steps, solver, S_churn, S_min, S_max, S_noise, batch,
        output).  The output is the request's: ``"tensor"`` (float64
        [N, C, H, W] in [-1, 1], on the backend's device), ``"uint8"`` (numpy
        [N, H, W, C]) or ``"pil"`` (a list of PIL images).  A latent model's
        request ends in images too: its latents are decoded (:meth:`decode`;
        ``"tensor"`` is then float32 [N, 3, 8h, 8w]), and only
        ``output="latents"`` returns them undecoded (float64 [N, C, h, w]).
        on_step(i) is called after each sampling step of each batch.
        """
        if isinstance(seeds, Request):
            if kwargs:
                raise UsageError(f"pass a Request or keywords, not both (got {', '.join(sorted(kwargs))})")
            request = seeds
        else:
            request = self.request(seeds, **kwargs)
        self.check(request)
        check_on_step(on_step)
        with self._lock:
            self.load()
            images = concat_batches(request, self._sample(request, on_step), self.device)
            if self.config.is_latent and request.output != "latents":
                images = self.decode(images)
        return as_output(images, request.output)

    @checked_arguments
    def batches(
        self, request: Request, on_step: Callable[[int], None] | None = None
    ) -> Iterator[tuple[tuple[int, ...], Tensor]]:
        """(seeds, float64 results on the device) per batch of ``request``, as the batches finish.

        The sample CLI's path: it writes and times each batch.  A latent
        model's results are its latents (:meth:`decode` makes images of them).
        The request and ``on_step`` are checked here, at the call; the
        generator's lock is held while each batch is sampled and released
        before it is handed out, so an iterator may be advanced from any
        thread (an executor's workers) and one its caller stopped reading
        blocks no other request.
        """
        self.check(request)
        check_on_step(on_step)
        return self._batches(request, on_step)

    def _batches(self, request: Request, on_step) -> Iterator[tuple[tuple[int, ...], Tensor]]:
        # The lock per batch, not across the yields: a threading lock is its acquiring thread's, so one held by a
        # suspended generator would fail to release on another thread and block every other caller meanwhile.
        # Between batches nothing of this run stays in the chain: each batch opens its own chain block, and its
        # result is a tensor of its own (BrickChain.sample).
        batches = self._sample(request, on_step)
        while True:
            with self._lock:
                self.load()
                found = next(batches, None)
            if found is None:
                return
            yield found

    # ------------------------------------------------------------------ latents to images
    @checked_arguments
    def decode(self, latents: Tensor) -> Tensor:
        """A latent model's latents [N, C, h, w] -> float32 images [N, 3, 8h, 8w] in [-1, 1], on the device.

        Runs the backend's VAE decoder (its ``vae_decoder`` engine, or
        diffusers' eager decoder) through ``backend.infer`` in chunks that fit
        the engine's batch profile and bound the activation memory; a chunk
        below the profile's smallest batch is padded with zero latents whose
        images are dropped.  Outside the sampling loop and its CUDA graphs.
        """
        cfg = self.config
        if not cfg.is_latent:
            raise UsageError(f"decode is for latent models; {cfg.name} samples pixels, which need no decoding")
        if not isinstance(latents, Tensor) or latents.dim() != 4 or latents.shape[1] != cfg.img_channels:
            got = list(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise UsageError(f"latents: expected a tensor [N, {cfg.img_channels}, h, w], got {got}")
        n, _, h, w = latents.shape
        self._check_decoder(h, w)
        if n == 0:  # a request of no seeds (a resume's empty remainder)
            return torch.empty(0, 3, VAE_UPSCALE * h, VAE_UPSCALE * w, device=self.device)
        profile = self.backend.decoder_profile()
        lo, hi = (profile.batch[0], profile.batch[2]) if profile is not None else (1, n)
        chunk = max(lo, min(hi, decode_chunk(decoder_architecture(self.backend), h, w, DECODE_BUDGET_BYTES)))
        with self._lock:
            self.load()
            parts = []
            for part in latents.split(chunk):
                k = part.shape[0]
                inputs, outputs = self._decode_buffers(max(k, lo), h, w)
                inputs["latents"][:k].copy_(part)
                inputs["latents"][k:].zero_()
                self.backend.infer(VAE_CALL, inputs, outputs)
                parts.append(outputs["images"][:k].clone())
        return torch.cat(parts)

    def _check_decoder(self, height: int, width: int) -> None:
        if not self.backend.has_decoder:
            raise UsageError(
                f"{self.config.name} samples latents and this generator has no VAE decoder: {NO_VAE_HINT} "
                "(vae=PATH in the Python API), or export one with lego-export --vae; output='latents' returns "
                "the latents undecoded"
            )
        profile = self.backend.decoder_profile()
        if profile is not None:
            profile.check(profile.batch[0], height, width)

    @torch.inference_mode(False)
    def _decode_buffers(self, batch: int, height: int, width: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The decoder's I/O of one chunk shape, allocated once (a few shapes kept: chunks repeat per batch)."""
        key = (batch, height, width)
        found = self._decoding.pop(key, None)
        if found is None:
            up = VAE_UPSCALE
            found = (
                {"latents": torch.zeros(batch, self.config.img_channels, height, width, device=self.device)},
                {"images": torch.zeros(batch, 3, up * height, up * width, device=self.device)},
            )
        self._decoding[key] = found  # newest last
        while len(self._decoding) > 4:
            self._decoding.pop(next(iter(self._decoding)))
        return found

    def _sample(self, request: Request, on_step) -> Iterator[tuple[tuple[int, ...], Tensor]]:
        def open_batch(labels: Tensor | None, batch: int):
            return self.chain.batch(
                labels,
                batch=batch,
                height=request.height,
                width=request.width,
                cfg_scale=request.cfg_scale,
                num_steps=request.steps,
                solver=request.solver,
                churn=request.churn.on,
            )

        def whole_run(denoise, latents: Tensor, **sampling: Any) -> Tensor:
            # The chain's whole-run entry point over the open batch: on CUDA one captured graph per run key.
            return self.chain.sample(latents, **sampling)

        return sample_batches(
            request, open_batch, device=self.device, default_batch=self.max_batch(request.guided), on_step=on_step,
            sampler=whole_run,
        )  # fmt: skip
