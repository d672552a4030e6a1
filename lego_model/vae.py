"""Latents to images: the Stable Diffusion autoencoder's decoder (diffusers' ``AutoencoderKL``).

The authors' latent models (the ``_32`` configs) denoise 32x32x4 latents of
the Stable Diffusion VAE (``sd-vae-ft-ema``); their generate.py turns them into
256x256 images with ``vae.decode(latents / 0.18215).sample``.  This module does
the same with weights from a local path (nothing is downloaded):

* a diffusers directory: ``config.json`` + ``diffusion_pytorch_model.safetensors``
  (what ``AutoencoderKL.save_pretrained`` writes and the hub repos hold);
* one ``.safetensors`` file of the same weights (diffusers' names, e.g. that
  directory's weights file on its own).  A single file carries no config: the
  architecture is read off the weight shapes and the scaling factor is the
  Stable Diffusion one, 0.18215.  Files with the original (ldm) names, e.g.
  ``vae-ft-ema-560000-ema-pruned.safetensors``, are refused with the one-line
  diffusers conversion to run first.

diffusers is an optional dependency (the ``latent`` extra) and is imported only
when a VAE is loaded, so ``import lego_model`` works without it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lego_model.checkpoints import file_sha256
from lego_model.configs import LegoConfig
from lego_model.errors import VaeError

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' file name inside a model directory
CONFIG_NAME = "config.json"
SD_SCALING_FACTOR = 0.18215  # Stable Diffusion's latent scale (diffusers' and ldm's default)
DECODE_BUDGET_BYTES = 2 << 30  # activation memory one decode chunk may take (see decode_chunk)
# Peak activation bytes of one decoded image per image pixel per channel entering the last up block: sd-vae-ft-ema
# (256 channels there) grew peak RSS by 0.36 GB decoding one 256x256 image, 0.57 GB for two (fp32, CPU): ~21.
_BYTES_PER_PIXEL_CHANNEL = 24

INSTALL_HINT = "pip install 'lego-deploy[latent]' (diffusers)"
NO_VAE_HINT = (
    "pass --vae PATH (a local diffusers AutoencoderKL directory or .safetensors file, e.g. sd-vae-ft-ema) "
    "to decode the latents into images"
)


def import_diffusers_vae() -> Any:
    """diffusers' ``AutoencoderKL`` class, or a VaeError that says what to install."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise VaeError(f"decoding latents needs diffusers: {INSTALL_HINT}") from None
    return AutoencoderKL


def unscale(latents: Tensor, scaling_factor: float, shift_factor: float | None) -> Tensor:
    """Sampler latents -> the autoencoder's latent space: divide by the scaling factor (then add the shift, if any)."""
    z = latents / scaling_factor
    return z if shift_factor is None else z + shift_factor


def upscale_of(config: dict[str, Any]) -> int:
    """Image side per latent side of an AutoencoderKL config: 2 per upsampling block (8 for Stable Diffusion's)."""
    return 2 ** (len(config.get("block_out_channels", (0,))) - 1)


class VaeDecoder(nn.Module):
    """latents [B, C, h, w] as the sampler returns them -> images [B, 3, 8h, 8w] in [-1, 1].

    The engine contract's ``vae_decoder`` (DESIGN.md): the division by the
    scaling factor (and the addition of a shift factor, for VAEs that have one)
    is part of the graph.  Holds only the decoder half of the autoencoder, so
    an export carries no encoder weights.  The output is not clamped; the
    uint8 conversion clips, as the authors' generate.py does.
    """

    def __init__(self, autoencoder: nn.Module, scaling_factor: float, shift_factor: float | None) -> None:
        super().__init__()
        self.post_quant_conv = autoencoder.post_quant_conv  # None for VAEs without it (use_post_quant_conv=False)
        self.decoder = autoencoder.decoder
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor

    def forward(self, latents: Tensor) -> Tensor:
        z = unscale(latents, self.scaling_factor, self.shift_factor)  # (B, C, h, w), the autoencoder's own scale
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)  # (B, C, h, w)
        return self.decoder(z)  # (B, 3, 8h, 8w)


@dataclass
class Vae:
    """One loaded autoencoder: the diffusers model, its latent scale, and where it came from."""

    model: nn.Module  # diffusers.AutoencoderKL, eval mode, float32, CPU
    source: str  # the path it was loaded from, resolved
    sha256: str  # of the weights file
    config: dict[str, Any]  # diffusers config of the architecture

    @property
    def scaling_factor(self) -> float:
        return float(self.config.get("scaling_factor", SD_SCALING_FACTOR))

    @property
    def shift_factor(self) -> float | None:
        shift = self.config.get("shift_factor")
        return None if shift is None else float(shift)

    @property
    def latent_channels(self) -> int:
        return int(self.config.get("latent_channels", 4))

    @property
    def upscale(self) -> int:
        """Image side per latent side (8 for Stable Diffusion's VAE)."""
        return upscale_of(self.config)

    def decoder(self) -> VaeDecoder:
        """The decoder as one module (the exported forward), sharing this VAE's weights."""
        return VaeDecoder(self.model, self.scaling_factor, self.shift_factor).eval()

    def check_model(self, config: LegoConfig) -> None:
        """Refuse a LEGO model whose samples this VAE cannot decode (pixel model, other latent channels)."""
        require_latent(config)
        if config.img_channels != self.latent_channels:
            raise VaeError(
                f"the VAE at {self.source} decodes {self.latent_channels}-channel latents, {config.name} samples "
                f"{config.img_channels}-channel ones; pass the autoencoder the model was trained with"
            )

    def decode(self, latents: Tensor, max_bytes: int = DECODE_BUDGET_BYTES) -> Tensor:
        """Images [B, 3, 8h, 8w] float32 in [-1, 1] from latents [B, C, h, w], ``decode_chunk`` images at a time.

        Runs diffusers' own ``AutoencoderKL.decode`` (the reference the
        exported engine is verified against) on the latents' device.
        """
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise VaeError(f"the VAE decodes [B, {self.latent_channels}, h, w] latents, got {list(latents.shape)}")
        model = self.model.to(latents.device)
        chunk = decode_chunk(self.config, latents.shape[2], latents.shape[3], max_bytes)
        with torch.inference_mode():
            parts = [
                model.decode(unscale(part.float(), self.scaling_factor, self.shift_factor)).sample
                for part in latents.split(chunk)  # (chunk, C, h, w) each
            ]
        return torch.cat(parts)  # (B, 3, 8h, 8w)


def require_latent(config: LegoConfig) -> None:
    """Refuse decoding the samples of a pixel model (there is nothing to decode)."""
    if not config.is_latent:
        raise VaeError(
            f"{config.name} generates pixels ({config.img_channels} channels), not latents: "
            "leave out --vae / --vae-backend"
        )


def decode_chunk(config: dict[str, Any], height: int, width: int, max_bytes: int = DECODE_BUDGET_BYTES) -> int:
    """Images per decode call so that the decoder's activations stay within ``max_bytes`` (at least 1).

    The peak sits in the last up block, at full image resolution with the
    widest full-resolution channel count; it grows linearly with the batch.
    """
    up = upscale_of(config)
    channels = max(config.get("block_out_channels", (128,))[:2])  # the last up block reads the second's output
    per_image = _BYTES_PER_PIXEL_CHANNEL * channels * (up * height) * (up * width)
    return max(1, max_bytes // per_image)


def load_vae(path: str | Path) -> Vae:
    """Load a diffusers ``AutoencoderKL`` from a local directory or single ``.safetensors`` file (see module doc)."""
    path = Path(path)
    if path.is_dir():
        config, weights_file = _read_directory(path)
        state = _read_weights(weights_file)
    elif path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise VaeError(
                f"--vae {path}: expected a diffusers AutoencoderKL directory or a .safetensors file, "
                f"got a {path.suffix or 'suffix-less'} file"
            )
        weights_file = path
        state = _read_weights(path)
        if any(k.startswith(("encoder.down.", "decoder.up.", "first_stage_model.")) for k in state):
            raise VaeError(
                f"--vae {path} has the original (ldm) weight names; convert it once with diffusers: "
                "AutoencoderKL.from_single_file(PATH, config=CONFIG_DIR).save_pretrained(DIR), then pass DIR"
            )
        config = _config_from_weights(state, path)
    else:
        raise VaeError(
            f"--vae {path} does not exist; pass a local diffusers AutoencoderKL directory "
            f"({CONFIG_NAME} + {WEIGHTS_NAME}) or a .safetensors file of it"
        )
    AutoencoderKL = import_diffusers_vae()
    try:
        model = AutoencoderKL.from_config(config)
    except (TypeError, ValueError, KeyError) as err:
        raise VaeError(f"--vae {path}: its config does not describe an AutoencoderKL ({err})") from None
    missing, unexpected = _load_state(model, state)
    if missing or unexpected:
        raise VaeError(
            f"--vae {path}: the weights do not fit the AutoencoderKL its config describes "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    model = model.float().eval().requires_grad_(False)
    full = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return Vae(model=model, source=str(path.resolve()), sha256=file_sha256(weights_file), config=full)


def _read_directory(path: Path) -> tuple[dict[str, Any], Path]:
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file():
        raise VaeError(f"--vae {path} has no {CONFIG_NAME}; pass a diffusers AutoencoderKL directory")
    if not weights_file.is_file():
        raise VaeError(f"--vae {path} has no {WEIGHTS_NAME}; save the VAE with save_pretrained (safetensors)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VaeError(f"--vae {config_file} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        found = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise VaeError(f"--vae {config_file} describes a {found}, not an AutoencoderKL")
    return config, weights_file


def _read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise VaeError(f"--vae {path} is not a readable safetensors file ({err})") from None


def _load_state(model: nn.Module, state: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        first = str(err).strip().splitlines()
        raise VaeError(f"the VAE weights do not fit its config ({first[-1].strip() if first else err})") from None
    return list(result.missing_keys), list(result.unexpected_keys)


def _config_from_weights(state: dict[str, Tensor], path: Path) -> dict[str, Any]:
    """The AutoencoderKL architecture a diffusers-named state dict implies; Stable Diffusion's scale."""
    try:
        blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
        layers = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))}
        channels = [int(state[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in blocks]
        config = {
            "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
            "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
            "latent_channels": int(state["decoder.conv_in.weight"].shape[1]),
            "block_out_channels": channels,
            "down_block_types": ["DownEncoderBlock2D"] * len(blocks),
            "up_block_types": ["UpDecoderBlock2D"] * len(blocks),
            "layers_per_block": len(layers),
            "use_quant_conv": "quant_conv.weight" in state,
            "use_post_quant_conv": "post_quant_conv.weight" in state,
            "mid_block_add_attention": any(k.startswith("decoder.mid_block.attentions.") for k in state),
            "scaling_factor": SD_SCALING_FACTOR,
        }
    except KeyError as err:
        raise VaeError(
            f"--vae {path} does not hold AutoencoderKL weights (no {err.args[0]}); pass a diffusers AutoencoderKL "
            "directory or its .safetensors file"
        ) from None
    if not channels:
        raise VaeError(f"--vae {path} does not hold AutoencoderKL weights (no encoder.down_blocks)")
    log.info("%s: architecture from its weights, scaling factor %s (Stable Diffusion's)", path, SD_SCALING_FACTOR)
    return config
