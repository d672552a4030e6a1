"""python -m runtimes.sample: parity with the eager sampler, the CLI end to end, resume, torchrun, refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lego_model.eager import sample_images
from lego_model.sampler import draw_latents, edm_sample
from lego_model.skip import SkipPlan
from runtimes.backends import open_backend
from runtimes.backends.torch_backend import TorchBackend
from runtimes.chain import BrickChain
from runtimes.outputs import read_png
from runtimes.sample import main
from tests.runtimes.conftest import export_onnx_dir, tiny_model

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def chain_images(backend, seeds, height, width, steps, plan, cfg_scale=None, class_idx=None, **churn):
    """Images of the runtime path: BrickChain driven by the model package's sampler, seeds as the CLI draws them."""
    cfg = backend.config
    latents, labels, rnd = draw_latents(seeds, cfg.img_channels, height, width, cfg.label_dim, class_idx)
    with backend:
        chain = BrickChain(backend)
        kw = dict(batch=len(seeds), height=height, width=width, cfg_scale=cfg_scale, num_steps=steps)
        with chain.batch(labels, **kw) as denoise:
            return edm_sample(
                denoise, latents, num_steps=steps, randn_like=rnd.randn_like, active_per_step=plan.steps(steps), **churn
            )


CASES = {
    "full": dict(height=16, width=16, plan=[], cfg_scale=None),
    "skip": dict(height=16, width=16, plan=["2@0.5:1", "0@0:0.34"], cfg_scale=None),
    "guidance": dict(height=16, width=16, plan=["2@0.5:1"], cfg_scale=2.0, class_idx=3),
    "large_non_square": dict(height=32, width=48, plan=[], cfg_scale=None, S_churn=5.0),
}


@pytest.mark.parametrize("case", CASES)
def test_runtime_backends_match_the_eager_sampler(engines_pg, case):
    spec = dict(CASES[case])
    model = tiny_model("tiny_PG_16")
    plan = SkipPlan.parse(spec.pop("plan"), model.config)
    seeds, steps = [3, 7], 5
    height, width, class_idx = spec.pop("height"), spec.pop("width"), spec.pop("class_idx", None)
    want = sample_images(model, seeds, size=(height, width), steps=steps, plan=plan, classes=class_idx, **spec)
    ort_backend, _ = open_backend("onnxruntime-cpu", engine_dir=engines_pg, threads=1)
    for backend, atol in ((ort_backend, 1e-3), (TorchBackend(model, device=CPU), 1e-12)):
        got = chain_images(backend, seeds, height, width, steps, plan, class_idx=class_idx, **spec)
        err = (got - want).abs().max().item()
        assert err <= atol, f"{backend.name}: max abs {err:.2e} > {atol:g} in [-1, 1] units"


def run_cli(*args: str):
    return CliRunner().invoke(main, ["--quiet", "--threads", "1", *args], catch_exceptions=False)


def one_line_error(result, pattern: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]


def test_cli_writes_pngs_grid_npz_and_summary(engines_pg, tmp_path):
    out, npz = tmp_path / "out", tmp_path / "x.npz"
    result = run_cli(
        "--engine-dir", str(engines_pg), "--backend", "onnxruntime-cpu", "--seeds", "0-4", "--steps", "3",
        "--batch", "2", "--skip-preset", "global", "--out", str(out), "--npz", str(npz),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for text in ("backend: onnxruntime-cpu", "precision fp32", "CUDA graphs off", "images/s", "ms per denoiser call",
                 "skip plan: 2@0.6:1", "relative cost"):  # fmt: skip
        assert text in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [f"{s:06d}.png" for s in range(5)] + ["grid.png", "run.json"]
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (5, 16, 16, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr[4], read_png(out / "000004.png"))
    # The same seeds through the eager model (no engine directory) give the same pictures (to one uint8 level).
    eager = tmp_path / "eager"
    res = run_cli("--random-init", "--config", "tiny_PG_16", "--seeds", "0-4", "--steps", "3", "--skip-preset",
                  "global", "--out", str(eager))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "backend: torch (no --engine-dir: the eager model)" in res.stdout
    for s in range(5):
        diff = np.abs(read_png(eager / f"{s:06d}.png").astype(int) - arr[s].astype(int)).max()
        assert diff <= 1, f"seed {s}: eager and ONNX Runtime images differ by {diff} levels"


def test_resume_samples_only_missing_seeds(engines_pg, tmp_path):
    out = tmp_path / "out"
    args = ["--engine-dir", str(engines_pg), "--seeds", "0-3", "--steps", "2", "--out", str(out)]
    assert run_cli(*args).exit_code == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("0*.png")}
    (out / "000002.png").unlink()
    result = run_cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert "sampled 1 images (3 already there)" in result.stdout
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("0*.png")}
    for name in ("000000.png", "000001.png", "000003.png"):
        assert after[name][0] == before[name][0]  # not rewritten
    assert after["000002.png"][1] == before["000002.png"][1]  # same seed, same image


def test_torchrun_two_ranks_share_seeds_and_rank0_writes_npz(engines_pg, tmp_path):
    out, npz = tmp_path / "dist", tmp_path / "dist.npz"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "runtimes.sample", "--quiet", "--engine-dir", str(engines_pg), "--seeds", "0-4",
        "--steps", "2", "--batch", "2", "--out", str(out), "--npz", str(npz),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 ranks" in proc.stdout and "sampled 5 images" in proc.stdout
    arr = np.load(npz)["arr_0"]
    assert arr.shape[0] == 5
    single = tmp_path / "single"
    assert (
        run_cli("--engine-dir", str(engines_pg), "--seeds", "0-4", "--steps", "2", "--out", str(single)).exit_code == 0
    )
    for s in range(5):
        np.testing.assert_array_equal(arr[s], read_png(single / f"{s:06d}.png"))


@pytest.fixture()
def tampered(engines_pg, tmp_path) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(engines_pg, copy)
    data = bytearray((copy / "brick1.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "brick1.onnx").write_bytes(bytes(data))
    return copy


REFUSALS = {
    "missing engine dir": (["--engine-dir", "{tmp}/nowhere"], "does not exist"),
    "engine backend, no engine dir": (["--backend", "openvino"], "--backend openvino runs the engines of an engine"),
    "tampered file": (["--engine-dir", "{tampered}"], "does not match its sha256"),
    "size not a multiple": (["--height", "24"], "multiples of 16"),
    "size outside profile": (["--height", "128"], "height 128 not in [16, 64]"),
    "batch above profile": (["--batch", "9"], "batch 9 not in [1, 8]"),
    "guided batch above profile": (["--batch", "5", "--cfg-scale", "2"], "guidance doubles the batch"),
    "class out of range": (["--class", "10"], "class 10 out of range"),
    "guidance, unconditional": (["--engine-dir", "{pr}", "--cfg-scale", "2"], "unconditional"),
    "class, unconditional": (["--engine-dir", "{pr}", "--class", "1"], "unconditional"),
    "tensorrt here": (["--backend", "tensorrt"], "tensorrt"),
    "output not writable": (["--out", "{tmp}/file/sub"], "cannot write to"),
    "npz not writable": (["--npz", "{tmp}/file/x.npz"], "cannot write to"),
    "bad skip plan": (["--skip", "0,1,2@0:1"], "no brick"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusals_are_one_line_and_come_before_any_compute(name, engines_pg, engines_pr, tampered, tmp_path):
    args, pattern = REFUSALS[name]
    (tmp_path / "file").write_text("not a directory")
    fill = {"tmp": str(tmp_path), "tampered": str(tampered), "pr": str(engines_pr)}
    args = [a.format(**fill) for a in args]
    if "--engine-dir" not in args and name != "engine backend, no engine dir":
        args = ["--engine-dir", str(engines_pg), *args]
    out = tmp_path / "out"
    if "--out" not in args:
        args += ["--out", str(out)]
    one_line_error(run_cli("--seeds", "0-1", "--steps", "2", *args), pattern)
    assert not list(out.glob("*.png")) if out.exists() else True


def test_torch_backend_from_checkpoint_without_engines(tmp_path):
    from lego_model.checkpoints import save_checkpoint

    ckpt = save_checkpoint(tiny_model("tiny_PR_16"), tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    result = run_cli("--backend", "torch", "--checkpoint", str(ckpt), "--seeds", "1", "--steps", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "backend: torch" in result.stdout and (out / "000001.png").is_file()


@pytest.fixture(scope="session")
def shipped_engines(tmp_path_factory) -> Path:
    from export.records import CheckpointRecord
    from lego_model.checkpoints import load_checkpoint
    from lego_model.errors import CheckpointError
    from lego_model.shipped import shipped_checkpoint

    try:
        path = shipped_checkpoint()
    except CheckpointError as err:
        pytest.skip(f"shipped model not available yet: {err}")
    checkpoint = CheckpointRecord.of_file(path)
    return export_onnx_dir(load_checkpoint(path), tmp_path_factory.mktemp("shipped"), checkpoint=checkpoint)


def test_cli_end_to_end_on_the_shipped_model(shipped_engines, tmp_path):
    out = tmp_path / "out"
    result = run_cli("--engine-dir", str(shipped_engines), "--backend", "onnxruntime-cpu", "--seeds", "0-3",
                     "--steps", "4", "--batch", "2", "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "backend: onnxruntime-cpu" in result.stdout
    # The torch backend rebuilds the model from the manifest's checkpoint record (sha256 verified).
    out_t = tmp_path / "torch"
    result = run_cli("--engine-dir", str(shipped_engines), "--backend", "torch", "--seeds", "0-3", "--steps", "4",
                     "--batch", "2", "--out", str(out_t))  # fmt: skip
    assert result.exit_code == 0, result.output
    for s in range(4):
        a, b = read_png(out / f"{s:06d}.png").astype(int), read_png(out_t / f"{s:06d}.png").astype(int)
        assert np.abs(a - b).max() <= 1


def test_default_batch_halves_under_guidance_to_fit_the_profile(engines_pg, tmp_path):
    # Profile batch 1..8: 6 guided images run as batches of 4 (8 engine rows), not refused.
    result = run_cli("--engine-dir", str(engines_pg), "--seeds", "0-5", "--steps", "2", "--cfg-scale", "2",
                     "--class", "1", "--out", str(tmp_path / "g"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "sampled 6 images" in result.stdout


def test_guidance_scale_1_is_no_guidance(engines_pg, tmp_path):
    # "1 = none", as --help says: unguided rows, so a batch of 8 fits the 1..8 profile, the images are the
    # unguided ones and run.json says guidance off
    outs = {}
    for name, scale in (("one", ("--cfg-scale", "1")), ("off", ())):
        outs[name] = tmp_path / name
        result = run_cli("--engine-dir", str(engines_pg), "--seeds", "0-7", "--batch", "8", "--steps", "2",
                         "--class", "3", *scale, "--out", str(outs[name]))  # fmt: skip
        assert result.exit_code == 0, result.output
    for i in range(8):
        assert (outs["one"] / f"{i:06d}.png").read_bytes() == (outs["off"] / f"{i:06d}.png").read_bytes()
    assert json.loads((outs["one"] / "run.json").read_text())["settings"]["guidance"] == "off"


def test_torch_backend_verifies_the_manifest_checkpoint(tmp_path):
    from export.records import CheckpointRecord
    from lego_model.checkpoints import save_checkpoint

    model = tiny_model("tiny_PR_16")
    ckpt = save_checkpoint(model, tmp_path / "pr.safetensors")
    # The engine files name the checkpoint they were exported from: export them from this one.
    engines = export_onnx_dir(model, tmp_path / "engines", checkpoint=CheckpointRecord.of_file(ckpt))
    args = ["--engine-dir", str(engines), "--backend", "torch", "--seeds", "0", "--steps", "2"]
    assert run_cli(*args, "--out", str(tmp_path / "a")).exit_code == 0
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")  # not the exported weights any more
    one_line_error(run_cli(*args, "--out", str(tmp_path / "b")), "sha256 differs")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the torch backend's CPU default (a GPU is visible)")
def test_torch_backend_replays_a_random_init_manifest(engines_pg, tmp_path):
    common = ["--engine-dir", str(engines_pg), "--seeds", "0-1", "--steps", "3"]
    assert run_cli(*common, "--backend", "onnxruntime-cpu", "--out", str(tmp_path / "ort")).exit_code == 0
    result = run_cli(*common, "--backend", "torch", "--out", str(tmp_path / "torch"))
    assert result.exit_code == 0, result.output
    assert "backend: torch (requested) on cpu" in result.stdout
    for s in range(2):
        a, b = (read_png(tmp_path / d / f"{s:06d}.png").astype(int) for d in ("ort", "torch"))
        assert np.abs(a - b).max() <= 1


def test_class_rows_sample_one_batch_per_class_and_grid_them(tmp_path):
    from PIL import Image

    out = tmp_path / "rows"
    result = run_cli("--config", "tiny_PG_16", "--random-init", "--seeds", "0-19", "--steps", "1", "--class-rows",
                     "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    # 10 rows of 2 images of 16 px with 2 px padding, enlarged 4x (each picture at least 64 px a side).
    assert Image.open(out / "grid.png").size == (4 * (2 * 18 + 2), 4 * (10 * 18 + 2))
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["class"] == {"per seed": [[s, s // 2] for s in range(20)]}
