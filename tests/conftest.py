"""Shared test fixtures: the authors' reference outputs in ../shared/fixtures."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LEGO_SHARED", REPO.parent / "shared"))
FIXTURE_JSON = SHARED / "fixtures" / "official_tiny.json"
FIXTURE_TENSORS = SHARED / "fixtures" / "official_tiny.safetensors"


@pytest.fixture(scope="session")
def official():
    """(description dict, tensor dict) of the authors' tiny-config outputs; skips where ../shared is absent."""
    if not (FIXTURE_JSON.is_file() and FIXTURE_TENSORS.is_file()):
        pytest.skip(f"authors' fixtures not found at {FIXTURE_JSON.parent} (set LEGO_SHARED to the shared/ folder)")
    from safetensors.torch import load_file

    return json.loads(FIXTURE_JSON.read_text()), load_file(str(FIXTURE_TENSORS))


def official_model(official, name: str):
    """A LegoModel of tiny config ``name`` carrying the fixture's weights (strict load)."""
    from lego_model import LegoModel, get_config

    _, tensors = official
    prefix = f"{name}/state/"
    model = LegoModel(get_config(name))
    model.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    return model.eval()


SD_VAE_CONFIG = Path(__file__).resolve().parent / "fixtures" / "sd-vae-ft-ema" / "config.json"
SMALL_VAE_CHANNELS = (32, 32, 64, 64)  # sd-vae-ft-ema's block structure with few channels


def make_vae_dir(path: Path, block_out_channels=SMALL_VAE_CHANNELS, seed: int = 0, **overrides) -> Path:
    """A random-weight AutoencoderKL with sd-vae-ft-ema's architecture (narrower), saved in diffusers' format."""
    pytest.importorskip("diffusers", reason="the latent extra (diffusers) is not installed")
    import torch
    from diffusers import AutoencoderKL

    config = json.loads(SD_VAE_CONFIG.read_text())
    config.update(block_out_channels=list(block_out_channels), **overrides)
    torch.manual_seed(seed)
    AutoencoderKL.from_config(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def small_vae_dir(tmp_path_factory) -> Path:
    """A small random AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors)."""
    return make_vae_dir(tmp_path_factory.mktemp("vae") / "small-vae")


@pytest.fixture(scope="session")
def latent_engines(small_vae_dir: Path, tmp_path_factory) -> Path:
    """lego-export's engine directory of tiny_latent_PG_8 (random init 0) with the small VAE's decoder.

    The ONNX files come from the TorchScript exporter (seconds instead of a minute); the dynamo export of
    the decoder is tested on its own in tests/export/test_vae_export.py.  Decoder batch profile 1:2:4.
    """
    from export.pipeline import ExportOptions, export_engine_dir
    from export.records import CheckpointRecord
    from lego_model import LegoModel, get_config
    from lego_model.vae import load_vae

    model = LegoModel(get_config("tiny_latent_PG_8")).randomize_(0).eval()
    options = ExportOptions(exporter="torchscript", vae=load_vae(small_vae_dir), vae_batch=(1, 2, 4))
    out = tmp_path_factory.mktemp("latent") / "engines"
    export_engine_dir(model, out, CheckpointRecord.random_init(0), options)
    return out


@pytest.fixture
def snapshot_modules():
    """Restores sys.modules' torch_utils entries, which writing an authors'-style snapshot registers."""
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    yield
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v
