"""Which VAE decoder a backend runs for a latent model: its own ``vae_decoder`` engine, or diffusers' eager one.

Latent models (the ``_32`` configs) sample Stable Diffusion latents; the
``vae_decoder`` is one more engine of the backend, run through the same
``backend.infer`` as the bricks (:data:`runtimes.backends.base.VAE_CALL`),
once per batch, outside the sampling loop and its CUDA graphs.  Which one a
backend gets (:func:`attach_decoder`, from :class:`BackendOptions`):

1. ``vae_backend="torch"`` (``--vae-backend torch``) or ``vae=PATH``
   (``--vae PATH``): diffusers' ``AutoencoderKL`` eagerly on the backend's
   device (weights from ``vae``, else the ones the manifest records, checked
   against their sha256);
2. else the manifest's ``vae_decoder`` engine of the backend's format (the
   ONNX file for ONNX Runtime and OpenVINO, the plan for TensorRT);
3. else, on the torch backend, the eager decoder of the manifest's VAE;
4. else none: the backend samples latents only (the Generator says how to get images).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lego_model.errors import VaeError
from lego_model.vae import Vae, load_vae, require_latent

if TYPE_CHECKING:
    from export.records import VaeRecord
    from lego_model.configs import LegoConfig
    from runtimes.backends.base import Backend, BackendOptions

VAE_BACKENDS = ("engine", "torch")


def attach_decoder(backend: Backend, opts: BackendOptions, engine_format: str | None) -> None:
    """Give ``backend`` the decoder :mod:`the rules above <runtimes.backends.decoding>` choose (or none).

    ``engine_format``: the format of the backend's engines (None for the
    torch backend).  Refuses a decoder option for a pixel model and a VAE
    whose latent channels differ from the model's, before anything loads.
    """
    if opts.vae_backend not in VAE_BACKENDS:
        raise VaeError(f"unknown --vae-backend {opts.vae_backend!r}; choose one of {', '.join(VAE_BACKENDS)}")
    config, manifest = backend.config, backend.manifest
    eager = opts.vae is not None or opts.vae_backend == "torch"
    if not config.is_latent:
        if eager:
            require_latent(config)
        return
    record = manifest.vae if manifest is not None else None
    if eager:
        backend.vae = eager_vae(config, opts.vae, record)
    elif manifest is not None and engine_format is not None and manifest.decoder_for(engine_format) is not None:
        backend.decoder_entry = manifest.decoder_for(engine_format)
    elif engine_format is None and record is not None:
        backend.vae = eager_vae(config, None, record)


def eager_vae(config: LegoConfig, vae: str | Path | Vae | None, record: VaeRecord | None) -> Vae:
    """diffusers' decoder: ``vae`` (a path or a loaded :class:`Vae`), else the manifest's source (sha256-checked)."""
    if isinstance(vae, Vae):
        loaded = vae
    elif vae is not None:
        loaded = load_vae(vae)
    else:
        if record is None:
            raise VaeError(
                "--vae-backend torch needs the VAE's weights: pass --vae PATH (the engine directory records none)"
            )
        source = Path(record.source)
        if not source.exists():
            raise VaeError(f"the manifest's VAE {source} is not here; pass its weights with --vae PATH")
        loaded = load_vae(source)
        if loaded.sha256 != record.sha256:
            raise VaeError(
                f"the VAE at {source} is not the one the vae_decoder was exported from (sha256 differs); "
                "pass the right weights with --vae PATH or re-export"
            )
    loaded.check_model(config)
    return loaded


def decoder_architecture(backend: Backend) -> dict[str, Any]:
    """What :func:`lego_model.vae.decode_chunk` needs to size a decode chunk: the VAE's block widths."""
    if backend.vae is not None:
        return backend.vae.config
    assert backend.manifest is not None and backend.manifest.vae is not None
    return {"block_out_channels": list(backend.manifest.vae.block_out_channels)}
