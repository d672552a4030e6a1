"""Latent models end in images: runtimes.sample through the vae_decoder engine and diffusers' eager decoder."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from lego_model.errors import VaeError
from runtimes.errors import OutputError
from runtimes.outputs import read_png
from runtimes.sample import main, run_sampling
from tests.conftest import make_vae_dir
from tests.runtimes.conftest import export_onnx_dir, tiny_model

pytest.importorskip("diffusers", reason="the latent extra (diffusers) is not installed")
import torch

SEEDS = "0-2"
STEPS = 3
EAGER = ["--config", "tiny_latent_PG_8", "--random-init", "--seeds", SEEDS, "--steps", str(STEPS)]  # seed 0 weights


def sample(engine_dir, out, backend="onnxruntime-cpu", **options):
    args = ["--engine-dir", str(engine_dir), "--backend", backend, "--seeds", SEEDS, "--steps", str(STEPS)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return run_sampling([*args, "--out", str(out), "--threads", "1"])


def pngs(out, seeds=(0, 1, 2)) -> np.ndarray:
    return np.stack([read_png(out / f"{s:06d}.png") for s in seeds]).astype(np.int16)


@pytest.fixture(scope="module")
def engine_run(latent_engines, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine_run")
    return sample(latent_engines, out), out


def test_engine_decoder_writes_images_and_times_decoding_apart(engine_run) -> None:
    report, out = engine_run
    assert report.decoder.startswith("onnxruntime-cpu") and report.decode_seconds > 0
    assert pngs(out).shape == (3, 64, 64, 3)  # 8x8 latents -> 64x64 images
    assert (out / "grid.png").is_file() and not list(out.glob("*.npy"))
    assert "decoded latents with onnxruntime-cpu" in report.summary() and "not included" in report.summary()


def test_torch_decoder_and_eager_generate_give_the_same_images(engine_run, latent_engines, tmp_path) -> None:
    _, engine_out = engine_run
    torch_report = sample(latent_engines, tmp_path / "torch", vae_backend="torch")  # weights from the manifest
    assert torch_report.decoder.startswith("torch")
    eager = CliRunner().invoke(
        main, [*EAGER, "--vae", load_source(latent_engines), "--out", str(tmp_path / "eager"), "--quiet"]
    )
    assert eager.exit_code == 0, eager.output
    ref = pngs(engine_out)
    assert len(np.unique(ref)) > 100  # real images, not saturated ones: the comparison below means something
    for other in (pngs(tmp_path / "torch"), pngs(tmp_path / "eager")):
        diff = np.abs(other - ref)
        assert diff.max() <= 1 and diff.mean() < 0.01  # uint8 rounding of ~1e-6 differences at most


def test_torch_backend_decodes_with_the_manifests_vae(engine_run, latent_engines, tmp_path) -> None:
    """The torch backend's decoder is diffusers eager, with the weights the manifest records."""
    report = sample(latent_engines, tmp_path, backend="torch")
    assert report.decoder.startswith("torch (diffusers")
    assert np.abs(pngs(tmp_path) - pngs(engine_run[1])).max() <= 1


def test_resume_skips_seeds_whose_latents_exist(tmp_path) -> None:
    engines = export_onnx_dir(tiny_model("tiny_latent_PG_8"), tmp_path / "engines")
    sample(engines, tmp_path / "out")
    report = sample(engines, tmp_path / "out", resume=True)
    assert report.skipped_existing == 3 and report.images == 0
    with np.load(tmp_path / "out" / "latents.npz") as data:
        assert data["arr_0"].shape == (3, 4, 8, 8)


def load_source(engine_dir) -> str:
    from export.manifest import load_manifest

    return load_manifest(engine_dir).vae.source


def test_non_square_latents_decode_to_non_square_images(latent_engines, tmp_path) -> None:
    sample(latent_engines, tmp_path, height=8, width=16)
    assert pngs(tmp_path).shape == (3, 64, 128, 3)


def test_without_a_decoder_latents_are_written_with_a_hint(tmp_path) -> None:
    engines = export_onnx_dir(tiny_model("tiny_latent_PG_8"), tmp_path / "engines")
    result = CliRunner().invoke(
        main,
        [
            "--engine-dir",
            str(engines),
            "--backend",
            "onnxruntime-cpu",
            "--seeds",
            SEEDS,
            "--steps",
            str(STEPS),
            "--out",
            str(tmp_path / "out"),
            "--quiet",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "without a VAE" in result.output and "--vae PATH" in result.output
    with np.load(tmp_path / "out" / "latents.npz") as data:
        assert data["arr_0"].shape == (3, 4, 8, 8) and data["arr_0"].dtype == np.float32
        assert list(data["seeds"]) == [0, 1, 2]
    assert not list((tmp_path / "out").glob("*.png"))
    eager = CliRunner().invoke(main, [*EAGER, "--out", str(tmp_path / "eager"), "--quiet"])
    assert eager.exit_code == 0 and "--vae PATH" in eager.output
    with np.load(tmp_path / "eager" / "latents.npz") as e, np.load(tmp_path / "out" / "latents.npz") as r:
        np.testing.assert_allclose(e["arr_0"], r["arr_0"], atol=1e-4)
    with pytest.raises(OutputError, match="--npz holds uint8 images"):
        sample(engines, tmp_path / "npz", npz=str(tmp_path / "all.npz"))
    with pytest.raises(VaeError, match="pass --vae PATH"):
        sample(engines, tmp_path / "t", vae_backend="torch")


def test_refusals_before_sampling(engines_pg, latent_engines, small_vae_dir, tmp_path) -> None:
    runner = CliRunner()
    base = ["--backend", "onnxruntime-cpu", "--seeds", "0", "--steps", "1", "--quiet", "--out", str(tmp_path / "o")]
    pixel = runner.invoke(main, ["--engine-dir", str(engines_pg), "--vae", str(small_vae_dir), *base])
    assert pixel.exit_code == 1 and "generates pixels" in pixel.output and "Traceback" not in pixel.output
    missing = runner.invoke(main, ["--engine-dir", str(latent_engines), "--vae", str(tmp_path / "nope"), *base])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    wide = make_vae_dir(tmp_path / "vae16", latent_channels=16)
    mismatch = runner.invoke(main, ["--engine-dir", str(latent_engines), "--vae", str(wide), *base])
    assert mismatch.exit_code == 1 and "16-channel latents" in mismatch.output
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    eager_pixel = runner.invoke(
        main, ["--config", "tiny_PG_16", "--random-init", "--vae", str(small_vae_dir), "--out", str(tmp_path)]
    )
    assert eager_pixel.exit_code == 1 and "generates pixels" in eager_pixel.output


def test_engine_decoder_chunks_within_its_batch_profile(latent_engines) -> None:
    """Chunks of at most the profile's max batch; a last chunk below its min is padded, and its padding dropped."""
    import dataclasses

    import torch

    from export.records import Profile
    from lego_model.vae import load_vae
    from runtimes import Generator

    gen = Generator.from_engine_dir(latent_engines, "onnxruntime-cpu", threads=1)
    entry = gen.backend.decoder_entry
    gen.backend.decoder_entry = dataclasses.replace(entry, profile=Profile((2, 2, 4), entry.profile.height,
                                                                           entry.profile.width))  # fmt: skip
    shapes = []
    infer = gen.backend.infer
    gen.backend.infer = lambda call, i, o: (shapes.append(tuple(i["latents"].shape)), infer(call, i, o))
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # chunks of 4 and 1 (+1 padding)
    with gen:
        images = gen.decode(latents)
    reference = load_vae(gen.backend.manifest.vae.source).decode(latents)
    assert shapes == [(4, 4, 8, 8), (2, 4, 8, 8)]
    assert images.shape == (5, 3, 64, 64)
    assert float((images - reference).abs().max() / reference.abs().max()) <= 1e-4


def test_the_python_api_ends_in_images(latent_engines, small_vae_dir) -> None:
    """Generator.generate decodes a latent model's latents (engine or eager VAE); latents only when asked for."""
    from PIL import Image

    from runtimes import Generator, UsageError

    kw = dict(steps=2, classes=3)
    with Generator.from_engine_dir(latent_engines, "onnxruntime-cpu", threads=1) as gen:
        images = gen.generate([0, 1], **kw)
        pil = gen.generate([0, 1], output="pil", **kw)
        latents = gen.generate([0, 1], output="latents", **kw)
        again = gen.decode(latents)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float64
    assert isinstance(pil[0], Image.Image) and pil[0].mode == "RGB" and pil[0].size == (64, 64)
    torch.testing.assert_close(again, images, atol=0, rtol=0)
    model = tiny_model("tiny_latent_PG_8")
    with Generator.from_checkpoint(model, device="cpu", vae=str(small_vae_dir)) as eager:
        torch.testing.assert_close(eager.generate([0, 1], **kw), images, atol=1e-3, rtol=0)  # ORT vs eager fp32
    bare = export_onnx_dir(model, latent_engines.parent / "no-vae")
    gen = Generator.from_engine_dir(bare, "onnxruntime-cpu", threads=1)
    for output in ("tensor", "uint8", "pil"):
        with pytest.raises(UsageError, match="has no VAE decoder: pass --vae PATH"):
            gen.generate([0], output=output, **kw)
    assert gen.generate([0], output="latents", **kw).shape == (1, 4, 8, 8)
    with pytest.raises(UsageError, match="output='latents' is for latent models"):
        Generator.from_checkpoint(tiny_model("tiny_PG_16"), device="cpu").generate([0], output="latents")


def test_openvino_decodes_with_its_own_compiled_vae_decoder_in_fp32(latent_engines) -> None:
    """The vae_decoder is one more OpenVINO engine (compiled fp32 whatever the bricks run), equal to ONNX Runtime's."""
    pytest.importorskip("openvino")
    from runtimes import Generator

    latents = torch.randn(3, 4, 8, 16, generator=torch.Generator().manual_seed(1))
    with Generator.from_engine_dir(latent_engines, "onnxruntime-cpu", threads=1) as ort_gen:
        want = ort_gen.decode(latents)
    with Generator.from_engine_dir(latent_engines, "openvino", threads=1, precision="auto") as ov_gen:
        got = ov_gen.decode(latents)
        # requests: the one of each engine's latest call (compiled per input shape)
        assert "vae_decoder" in ov_gen.backend.requests and ov_gen.backend.decoder_name().startswith("openvino")
    # Both run the same fp32 graph; kernels differ only in summation order (~1e-6 of the output range).
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-4
