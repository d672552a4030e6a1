"""The vae_decoder engine: ONNX export, parity with diffusers' eager decoder, manifest record, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from export.cli import main as export_main
from export.errors import ManifestError
from export.manifest import load_manifest
from export.onnx_export import onnx_from_spec
from export.records import Manifest
from export.vae_spec import vae_decoder_spec
from export.verify import onnx_runner, verify_engine
from lego_model.checkpoints import file_sha256
from lego_model.configs import get_config
from lego_model.errors import VaeError
from lego_model.model import LegoModel
from lego_model.vae import WEIGHTS_NAME, Vae, load_vae
from tests.conftest import SD_VAE_CONFIG

pytest.importorskip("diffusers", reason="the latent extra (diffusers) is not installed")

LATENT = get_config("tiny_latent_PG_8")
# Square at the training size, non-square with batch 2, and larger than training (32x64 latents: 256x512 images).
PARITY_SHAPES = [(1, 8, 8), (2, 8, 16), (1, 32, 64)]


@pytest.fixture(scope="module")
def decoder_onnx(small_vae_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Vae, Path, dict, str]:
    """The small VAE's decoder exported with the default (dynamo) exporter and verified at PARITY_SHAPES."""
    vae = load_vae(small_vae_dir)
    spec = vae_decoder_spec(vae, LATENT)
    path = tmp_path_factory.mktemp("vae_onnx") / "vae_decoder.onnx"
    exporter = onnx_from_spec(spec, vae, path, "fp32")
    return vae, path, verify_engine(spec, vae, onnx_runner(spec, path, "fp32"), "fp32", PARITY_SHAPES), exporter


def test_decoder_matches_diffusers_at_three_shapes(decoder_onnx) -> None:
    _, _, verification, exporter = decoder_onnx
    assert exporter == "dynamo"
    assert set(verification.shapes) == {"1x8x8", "2x8x16", "1x32x64"}
    for key, err in verification.shapes.items():
        assert err.max_rel <= 1e-4, key


def test_decoder_file_has_the_contract_io(decoder_onnx) -> None:
    import onnx
    import onnxruntime as ort

    vae, path, _, _ = decoder_onnx
    model = onnx.load(str(path))
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output]
    assert [i.name for i in model.graph.input] == ["latents"] and dims == [["B", 3, "8*H", "8*W"]]
    assert all(not init.name.startswith("encoder") for init in model.graph.initializer)  # decoder half only
    # the scaling-factor division is inside: raw sampler latents in, diffusers' images out
    latents = torch.randn(1, 4, 16, 8)
    (images,) = ort.InferenceSession(str(path)).run(None, {"latents": latents.numpy()})
    with torch.no_grad():
        ref = vae.model.decode(latents / 0.18215).sample
    assert images.shape == (1, 3, 128, 64)
    assert float((torch.from_numpy(images) - ref).abs().max() / ref.abs().max()) <= 1e-4


@pytest.mark.slow
def test_the_real_sd_vae_ft_ema_architecture_exports_and_runs(tmp_path: Path) -> None:
    """sd-vae-ft-ema's architecture (tests/fixtures, random weights) through the same export and check."""
    from diffusers import AutoencoderKL

    config = json.loads(SD_VAE_CONFIG.read_text())
    torch.manual_seed(0)
    model = AutoencoderKL.from_config(config).eval()
    full = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    vae = Vae(model=model, source=str(SD_VAE_CONFIG.parent), sha256="0" * 64, config=full)
    spec = vae_decoder_spec(vae, get_config("lego_XL_U_32"))
    path = tmp_path / "vae_decoder.onnx"
    onnx_from_spec(spec, vae, path, "fp32")
    result = verify_engine(spec, vae, onnx_runner(spec, path, "fp32"), "fp32", [(1, 4, 6)])  # 32x48 images
    assert result.max_rel <= 1e-4
    assert path.stat().st_size > 4 * 49e6  # 49.5 M decoder parameters in fp32


def test_engine_directory_records_the_decoder(latent_engines: Path, small_vae_dir: Path) -> None:
    manifest = load_manifest(latent_engines)
    assert list(manifest.engines_for("onnx")) == ["embedder", "brick0", "brick1", "brick2"]  # the denoiser only
    entry = manifest.decoder_for("onnx")
    assert entry is not None and entry.kind == "vae_decoder" and entry.precision == "fp32"
    assert entry.profile.batch == (1, 2, 4) and manifest.engines_for("onnx")["brick0"].profile.batch == (1, 1, 8)
    assert entry.profile.height == manifest.engines_for("onnx")["brick0"].profile.height
    assert entry.verification.max_rel <= 1e-4 and len(entry.verification.shapes) == 3
    vae = manifest.vae
    assert vae.source == str(small_vae_dir.resolve()) and vae.sha256 == file_sha256(small_vae_dir / WEIGHTS_NAME)
    assert vae.scaling_factor == 0.18215 and vae.shift_factor is None and vae.block_out_channels == (32, 32, 64, 64)
    import onnx

    props = {p.key: p.value for p in onnx.load(str(entry.path(latent_engines))).metadata_props}
    assert props["lego.kind"] == "vae_decoder" and props["lego.checkpoint"] == f"sha256:{vae.sha256}"  # its weights


def test_manifest_refuses_a_decoder_without_its_vae_record(latent_engines: Path) -> None:
    data = json.loads((latent_engines / "manifest.json").read_text())
    Manifest.from_dict(data)
    with pytest.raises(ManifestError, match="needs a 'vae' record"):
        Manifest.from_dict({k: v for k, v in data.items() if k != "vae"})
    with pytest.raises(ManifestError, match="unknown field"):
        Manifest.from_dict({**data, "vae": {**data["vae"], "scale": 1}})


def test_pixel_models_and_mismatched_vaes_are_refused_before_writing(small_vae_dir: Path, tmp_path: Path) -> None:
    from tests.conftest import make_vae_dir

    runner = CliRunner()
    out = tmp_path / "engines"
    pixel = runner.invoke(
        export_main, ["--config", "tiny_PG_16", "--random-init", "--vae", str(small_vae_dir), "--out", str(out)]
    )
    assert pixel.exit_code == 1 and "generates pixels" in pixel.output and not out.exists()
    wide = make_vae_dir(tmp_path / "vae16", latent_channels=16)
    mismatch = runner.invoke(
        export_main, ["--config", "tiny_latent_PG_8", "--random-init", "--vae", str(wide), "--out", str(out)]
    )
    assert mismatch.exit_code == 1 and "16-channel latents" in mismatch.output and not out.exists()
    missing = runner.invoke(
        export_main,
        ["--config", "tiny_latent_PG_8", "--random-init", "--vae", str(tmp_path / "nope"), "--out", str(out)],
    )
    assert missing.exit_code == 1 and "does not exist" in missing.output and "Traceback" not in missing.output
    alone = runner.invoke(export_main, ["--config", "tiny_latent_PG_8", "--random-init", "--vae-batch", "1:1:4"])
    assert alone.exit_code == 2 and "--vae PATH" in alone.output
    with pytest.raises(VaeError, match="generates pixels"):
        vae_decoder_spec(load_vae(small_vae_dir), LegoModel(get_config("tiny_PR_16")).config)


def test_spec_refuses_half_precision(small_vae_dir: Path) -> None:
    from export.errors import ExportError

    with pytest.raises(ExportError, match="fp32 only"):
        vae_decoder_spec(load_vae(small_vae_dir), LATENT).module(load_vae(small_vae_dir), "fp16")
