"""Eager latent decoding (lego_model.vae): loading a local AutoencoderKL, scaling, chunks, refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lego_model.configs import get_config
from lego_model.errors import VaeError
from lego_model.vae import CONFIG_NAME, WEIGHTS_NAME, decode_chunk, load_vae, require_latent
from tests.conftest import REPO, SD_VAE_CONFIG, make_vae_dir

pytest.importorskip("diffusers", reason="the latent extra (diffusers) is not installed")

LATENT = get_config("tiny_latent_PG_8")


def diffusers_decode(vae, latents: torch.Tensor, scale: float) -> torch.Tensor:
    with torch.no_grad():
        return vae.model.decode(latents / scale).sample


def test_directory_decodes_as_diffusers_with_the_scaling_factor(small_vae_dir: Path) -> None:
    vae = load_vae(small_vae_dir)
    assert vae.scaling_factor == 0.18215 and vae.latent_channels == 4 and vae.upscale == 8
    latents = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(0))
    images = vae.decode(latents)
    assert images.shape == (2, 3, 64, 128) and images.dtype == torch.float32  # non-square: 8x each side
    torch.testing.assert_close(images, diffusers_decode(vae, latents, 0.18215), rtol=0, atol=0)
    # the exported forward (the engine's graph) computes the same
    with torch.no_grad():
        # The same diffusers decode, the division by the scaling factor inside the module instead of before it.
        torch.testing.assert_close(vae.decoder()(latents), images, rtol=0, atol=1e-6)


def test_variable_resolution_32x64_latents_decode_to_256x512(small_vae_dir: Path) -> None:
    images = load_vae(small_vae_dir).decode(torch.randn(1, 4, 32, 64))
    assert images.shape == (1, 3, 256, 512)


def test_chunks_bound_memory_and_change_nothing(small_vae_dir: Path) -> None:
    vae = load_vae(small_vae_dir)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert decode_chunk(vae.config, 8, 8, max_bytes=1) == 1
    # Chunks of one image vs one batch of three: convolutions blocked differently (fp32 sums over 3x3xC <= 2304
    # terms, ~50 layers: ~sqrt(2304) * 2^-24 * 50 ~ 1.5e-4 relative at worst, images in [-1, 1]).
    torch.testing.assert_close(vae.decode(latents, max_bytes=1), vae.decode(latents), rtol=1e-5, atol=5e-5)
    sd = json.loads(SD_VAE_CONFIG.read_text())
    # sd-vae-ft-ema at 256x256 (32x32 latents): a few images per 2 GiB chunk, fewer at 512x512
    assert decode_chunk(sd, 32, 32) > decode_chunk(sd, 64, 64) >= 1


def test_scaling_factor_from_the_config(tmp_path: Path) -> None:
    vae = load_vae(make_vae_dir(tmp_path / "vae", scaling_factor=0.13025))
    latents = torch.randn(1, 4, 8, 8)
    assert vae.scaling_factor == 0.13025
    torch.testing.assert_close(vae.decode(latents), diffusers_decode(vae, latents, 0.13025), rtol=0, atol=0)


def test_single_safetensors_file(small_vae_dir: Path, tmp_path: Path) -> None:
    single = tmp_path / "vae.safetensors"
    shutil.copyfile(small_vae_dir / WEIGHTS_NAME, single)
    from_file, from_dir = load_vae(single), load_vae(small_vae_dir)
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "down_block_types", "up_block_types"):
        a, b = from_file.config[key], from_dir.config[key]
        assert (list(a), key) == (list(b), key) if isinstance(a, (list, tuple)) else a == b
    assert from_file.scaling_factor == 0.18215 and from_file.sha256 == from_dir.sha256
    latents = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(from_file.decode(latents), from_dir.decode(latents), rtol=0, atol=0)


def test_the_real_sd_vae_ft_ema_config_differs_from_diffusers_defaults() -> None:
    """The fixture holds the architecture the authors decode with; diffusers' defaults are a one-block toy."""
    from diffusers import AutoencoderKL

    real = json.loads(SD_VAE_CONFIG.read_text())
    default = AutoencoderKL.from_config({}).config
    assert real["block_out_channels"] == [128, 256, 512, 512] and list(default.block_out_channels) == [64]
    assert real["layers_per_block"] == 2 and default.layers_per_block == 1
    assert len(real["up_block_types"]) == 4 and real["latent_channels"] == 4 and real["sample_size"] == 256
    assert AutoencoderKL.from_config(real).config.scaling_factor == 0.18215  # the file predates the key


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("nowhere", None, "does not exist"),
        ("empty", "dir", "has no config.json"),
        ("weights.bin", b"x", "a .bin file"),
        ("bad.safetensors", b"not a safetensors file", "not a readable safetensors file"),
    ],
)
def test_missing_or_malformed_paths_are_refused(tmp_path: Path, name: str, content, message: str) -> None:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(VaeError, match=message):
        load_vae(path)


def test_malformed_directories_are_refused(small_vae_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(small_vae_dir, broken)
    (broken / CONFIG_NAME).write_text("{not json")
    with pytest.raises(VaeError, match="not valid JSON"):
        load_vae(broken)
    (broken / CONFIG_NAME).write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(VaeError, match="UNet2DModel, not an AutoencoderKL"):
        load_vae(broken)
    config = json.loads((small_vae_dir / CONFIG_NAME).read_text())
    (broken / CONFIG_NAME).write_text(json.dumps({**config, "block_out_channels": [64, 64, 128, 128]}))
    with pytest.raises(VaeError, match="do not fit"):
        load_vae(broken)
    (broken / WEIGHTS_NAME).unlink()
    with pytest.raises(VaeError, match=f"has no {WEIGHTS_NAME}"):
        load_vae(broken)


def test_pixel_models_and_other_latent_channels_are_refused(tmp_path: Path, small_vae_dir: Path) -> None:
    with pytest.raises(VaeError, match="generates pixels"):
        require_latent(get_config("tiny_PG_16"))
    load_vae(small_vae_dir).check_model(LATENT)
    wide = load_vae(make_vae_dir(tmp_path / "vae16", latent_channels=16))
    with pytest.raises(VaeError, match="16-channel latents, tiny_latent_PG_8 samples 4-channel"):
        wide.check_model(LATENT)


def test_lego_model_works_without_diffusers() -> None:
    """The core imports no diffusers; loading a VAE without it says what to install."""
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import lego_model, lego_model.vae, lego_model.eager, lego_model.request\n"
        "assert 'diffusers' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "from lego_model.errors import VaeError\n"
        "try:\n    lego_model.vae.import_diffusers_vae()\nexcept VaeError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert "pip install 'lego-deploy[latent]'" in out.stdout
