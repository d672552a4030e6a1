"""Latents to images after sampling: the engine directory's ``vae_decoder`` or diffusers' eager decoder.

Latent models (the ``_32`` configs) sample Stable Diffusion latents; a
:class:`Decoder` turns one finished batch of them into images.  It runs once
per batch, after the sampling loop and outside its CUDA graphs, and is timed
apart from it.  Which decoder a run gets (:func:`open_decoder`):

1. ``--vae-backend torch``, or ``--vae PATH``: diffusers' ``AutoencoderKL``
   eagerly on the backend's device (weights from ``--vae``, else the ones the
   manifest records, checked against their sha256);
2. else the manifest's ``vae_decoder`` engine of the brick backend's format
   (ONNX for ONNX Runtime, the plan for TensorRT);
3. else, with the torch backend, the eager decoder of the manifest's VAE;
4. else none: the run writes its latents and says how to get images.

Each decoder splits a batch into chunks that fit its profile and bound its
activation memory (:func:`lego_model.vae.decode_chunk`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from export.loaders import SessionSettings, context_from_engine, engine_from_entry, plan_runtime, session_from_onnx
from lego_model.configs import LegoConfig
from lego_model.errors import VaeError
from lego_model.vae import DECODE_BUDGET_BYTES, Vae, decode_chunk, load_vae, require_latent
from runtimes.errors import BackendError

if TYPE_CHECKING:
    from export.records import EngineEntry, Manifest

log = logging.getLogger(__name__)

VAE_BACKENDS = ("engine", "torch")


class Decoder:
    """Latents [B, C, h, w] -> images [B, 3, 8h, 8w] float32 in [-1, 1] on the CPU; a context manager."""

    name: str = "decoder"

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def check(self, height: int, width: int) -> None:
        """Refuse (before any sampling) latent sizes the decoder cannot take; any batch is chunked."""

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError


class TorchDecoder(Decoder):
    """diffusers' ``AutoencoderKL.decode`` on ``device``, in memory-bounded chunks."""

    def __init__(self, vae: Vae, device: torch.device) -> None:
        self.vae = vae
        self.device = device
        self.name = f"torch (diffusers AutoencoderKL on {device})"

    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents.float().to(self.device)).cpu()


class EngineDecoder(Decoder):
    """A ``vae_decoder`` engine: its profile bounds the latent sides and the chunk size."""

    def __init__(self, entry: EngineEntry, engine_dir: str | Path, config: dict[str, Any]) -> None:
        self.entry = entry
        self.path = entry.path(engine_dir)
        self.config = config  # the autoencoder's architecture, for the memory bound of a chunk

    def check(self, height: int, width: int) -> None:
        lo = self.entry.profile.batch[0]
        self.entry.profile.check(lo, height, width)

    def chunk(self, height: int, width: int) -> int:
        lo, _, hi = self.entry.profile.batch
        return max(lo, min(hi, decode_chunk(self.config, height, width, DECODE_BUDGET_BYTES)))

    def decode(self, latents: Tensor) -> Tensor:
        latents = latents.float()
        size = self.chunk(latents.shape[2], latents.shape[3])
        return torch.cat([self._run_padded(part) for part in latents.split(size)])

    def _run_padded(self, part: Tensor) -> Tensor:
        """A chunk below the profile's smallest batch is padded with zero latents; their images are dropped."""
        lo, n = self.entry.profile.batch[0], part.shape[0]
        if n < lo:
            part = torch.cat([part, part.new_zeros(lo - n, *part.shape[1:])])
        return self.run(part.contiguous())[:n]

    def run(self, latents: Tensor) -> Tensor:
        """One chunk through the engine; returns CPU float32 images."""
        raise NotImplementedError


class OnnxDecoder(EngineDecoder):
    """The ONNX ``vae_decoder`` in ONNX Runtime (CPU or CUDA provider), fed from host memory.

    It runs once per batch, so plain ``session.run`` (copies in and out) costs
    nothing next to the decoder's convolutions; no I/O binding is kept.
    """

    def __init__(self, entry: EngineEntry, engine_dir: str | Path, config: dict[str, Any], *, device, threads) -> None:
        super().__init__(entry, engine_dir, config)
        self.device = device
        self.threads = threads
        self.name = f"onnxruntime-{device.type} (vae_decoder.onnx)"
        self.session: Any = None

    def __enter__(self) -> OnnxDecoder:
        settings = SessionSettings(device=self.device, threads=self.threads)  # no spinning: see export.loaders
        self.session = session_from_onnx(self.path, settings)
        return self

    def __exit__(self, *exc: object) -> None:
        self.session = None

    def run(self, latents: Tensor) -> Tensor:
        (images,) = self.session.run(["images"], {"latents": latents.cpu().numpy()})
        return torch.from_numpy(np.asarray(images, dtype=np.float32))


class TensorRTDecoder(EngineDecoder):
    """The ``vae_decoder`` plan on the GPU, enqueued on torch's current stream (not in any CUDA graph)."""

    def __init__(
        self, entry: EngineEntry, engine_dir: str | Path, config: dict[str, Any], *, device, manifest: Manifest
    ) -> None:
        super().__init__(entry, engine_dir, config)
        self.device = device
        self.manifest = manifest  # the plan's identity names the VAE's weights it records
        self.engine_dir = Path(engine_dir)
        self.name = "tensorrt (vae_decoder.plan)"
        self.engine: Any = None
        self.context: Any = None
        self._runtime: Any = None

    def __enter__(self) -> TensorRTDecoder:
        from runtimes.backends.trt import check_engines_here

        for warning in check_engines_here({self.entry.name: self.entry}, self.device):
            log.warning(warning)
        self._runtime = plan_runtime()
        self.engine = engine_from_entry(self._runtime, self.entry, self.manifest, self.engine_dir)
        # Its own scratch memory: the bricks' contexts are idle by the time a batch is decoded.
        self.context = context_from_engine(self.engine, self.entry.name)
        return self

    def __exit__(self, *exc: object) -> None:
        self.context = None
        self.engine = None
        self._runtime = None

    def run(self, latents: Tensor) -> Tensor:
        latents = latents.to(self.device).contiguous()
        if not self.context.set_input_shape("latents", tuple(latents.shape)):
            raise BackendError(f"TensorRT refused latents of shape {tuple(latents.shape)} for vae_decoder")
        images = torch.empty(tuple(self.context.get_tensor_shape("images")), dtype=torch.float32, device=self.device)
        self.context.set_tensor_address("latents", latents.data_ptr())
        self.context.set_tensor_address("images", images.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise BackendError("TensorRT failed to enqueue vae_decoder")
        return images.cpu()  # waits for the stream: the decode clock reads finished work


def open_decoder(
    config: LegoConfig,
    *,
    backend: str,
    device: torch.device,
    manifest: Manifest | None = None,
    engine_dir: str | Path | None = None,
    vae_path: str | Path | None = None,
    vae_backend: str = "engine",
    threads: int = 1,
) -> Decoder | None:
    """The decoder of a sampling run (see the module doc), or None when the run writes latents.

    Refuses ``--vae`` / ``--vae-backend torch`` for pixel models and a VAE
    whose latent channels differ from the model's, before anything is sampled.
    """
    if vae_backend not in VAE_BACKENDS:
        raise VaeError(f"unknown --vae-backend {vae_backend!r}; choose one of {', '.join(VAE_BACKENDS)}")
    record = manifest.vae if manifest is not None else None
    if not config.is_latent:
        if vae_path is not None or vae_backend == "torch":
            require_latent(config)
        return None
    if vae_path is not None or vae_backend == "torch":
        return TorchDecoder(_eager_vae(config, vae_path, record), device)
    if manifest is not None and engine_dir is not None:
        if backend == "tensorrt" and (entry := manifest.decoder_for("tensorrt")) is not None:
            return TensorRTDecoder(entry, engine_dir, _architecture(record), device=device, manifest=manifest)
        # The openvino backend runs the same ONNX files; its vae_decoder.onnx is decoded by ONNX Runtime (cpu extra).
        onnx_brick_backend = backend.startswith("onnxruntime") or backend == "openvino"
        if onnx_brick_backend and (entry := manifest.decoder_for("onnx")) is not None:
            return OnnxDecoder(entry, engine_dir, _architecture(record), device=device, threads=threads)
    if backend == "torch" and record is not None:
        return TorchDecoder(_eager_vae(config, None, record), device)
    return None


def _eager_vae(config: LegoConfig, vae_path: str | Path | None, record: Any) -> Vae:
    """The VAE for eager decoding: ``--vae``, else the manifest's source (its sha256 must match)."""
    if vae_path is None:
        if record is None:
            raise VaeError(
                "--vae-backend torch needs the VAE's weights: pass --vae PATH (the engine directory records none)"
            )
        source = Path(record.source)
        if not source.exists():
            raise VaeError(f"the manifest's VAE {source} is not here; pass its weights with --vae PATH")
        vae = load_vae(source)
        if vae.sha256 != record.sha256:
            raise VaeError(
                f"the VAE at {source} is not the one the vae_decoder was exported from (sha256 differs); "
                "pass the right weights with --vae PATH or re-export"
            )
    else:
        vae = load_vae(vae_path)
    vae.check_model(config)
    return vae


def _architecture(record: Any) -> dict[str, Any]:
    """What :func:`decode_chunk` needs from the manifest's VAE record."""
    return {"block_out_channels": list(record.block_out_channels)}
