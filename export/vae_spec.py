"""The ``vae_decoder`` engine of latent models: latents -> images through the Stable Diffusion autoencoder.

Engine contract (DESIGN.md): input ``latents`` [B, C, H, W] as the sampler
returns them (H, W: latent sides, the bricks' image sides), output ``images``
[B, 3, 8H, 8W] in [-1, 1]; the division by the VAE's scaling factor is inside
the graph.  The spec has the same shape as :class:`export.specs.EngineSpec`
(names, I/O, dynamic dims, sample inputs, the module to export), so the ONNX
export, the verification and the TensorRT build take it unchanged; the "model"
they pass around is a :class:`lego_model.vae.Vae` instead of a LegoModel.

The decoder is exported in float32 whatever ``--precision`` the bricks get:
the Stable Diffusion VAE overflows in fp16 (diffusers upcasts it,
``force_upcast``), and it runs once per batch, not once per step.
Its batch profile is its own: guidance doubles the bricks' rows, not the images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from export.errors import ExportError
from export.records import VAE_ENGINE, VAE_UPSCALE, Profile, TensorSpec, VaeRecord, contract_io
from lego_model.configs import LegoConfig
from lego_model.errors import VaeError
from lego_model.vae import Vae

PRECISION = "fp32"
DEFAULT_VAE_BATCH = (1, 1, 8)


@dataclass(frozen=True)
class VaeDecoderSpec:
    """Names, I/O (the engine contract's, :func:`export.records.contract_io`), dynamic dims and sample inputs."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    name: str = VAE_ENGINE
    kind: str = VAE_ENGINE
    brick: None = None
    tile: int = 1  # any latent side decodes

    @property
    def latent_channels(self) -> int:
        return int(self.inputs[0].shape[1])

    @property
    def input_names(self) -> list[str]:
        return ["latents"]

    @property
    def output_names(self) -> list[str]:
        return ["images"]

    def module(self, vae: Vae, precision: str) -> nn.Module:
        """The forward to export: :class:`lego_model.vae.VaeDecoder`, float32."""
        if precision != PRECISION:
            raise ExportError(f"the VAE decoder is exported in fp32 only (asked for {precision})")
        return vae.decoder()

    def sample_inputs(self, vae: Vae, batch: int, height: int, width: int, seed: int = 0) -> dict[str, Tensor]:
        """Latents as the sampler returns them: roughly unit-variance (scaled SD latents), float32."""
        gen = torch.Generator().manual_seed(seed)
        return {"latents": torch.randn(batch, self.latent_channels, height, width, generator=gen)}

    def reference(self, vae: Vae, inputs: dict[str, Tensor]) -> np.ndarray:
        """What the engine must reproduce: diffusers' own ``AutoencoderKL.decode`` (chunking aside)."""
        return vae.decode(inputs["latents"]).numpy()

    def dynamic_shapes(self) -> tuple[dict[int, object], ...]:
        """torch.export dims: B, H and W free and independent (non-square latents decode too)."""
        from torch.export import Dim

        return ({0: Dim("B", min=1), 2: Dim("H", min=1), 3: Dim("W", min=1)},)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """The same dims for the TorchScript exporter."""
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in [*self.inputs, *self.outputs]
        }


def vae_decoder_spec(vae: Vae, config: LegoConfig) -> VaeDecoderSpec:
    """The decoder spec of ``vae`` for latent model ``config``; refuses a VAE that cannot decode its samples."""
    vae.check_model(config)
    if vae.upscale != VAE_UPSCALE:
        raise VaeError(
            f"the VAE at {vae.source} upsamples {vae.upscale}x; the vae_decoder engine is the Stable Diffusion "
            f"autoencoder's {VAE_UPSCALE}x (four blocks); decode it eagerly with --vae instead"
        )
    return VaeDecoderSpec(*contract_io(config, VAE_ENGINE))


def vae_profile(bricks: Profile, batch: tuple[int, int, int] = DEFAULT_VAE_BATCH) -> Profile:
    """The decoder's profile: its own batch range, the bricks' latent height and width ranges."""
    return Profile(batch=batch, height=bricks.height, width=bricks.width)


def vae_record(vae: Vae) -> VaeRecord:
    """The manifest's record of the autoencoder behind the decoder engines."""
    return VaeRecord(
        source=vae.source,
        sha256=vae.sha256,
        scaling_factor=vae.scaling_factor,
        shift_factor=vae.shift_factor,
        latent_channels=vae.latent_channels,
        block_out_channels=tuple(vae.config["block_out_channels"]),
    )
