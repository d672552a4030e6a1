"""python -m runtimes.sample as a hostile user drives it (issue 10).

Every refused case: exit code 1, one line on stderr that starts with ``error:``
(no traceback: the CLI runs in-process with exceptions propagating), and every
file that existed before, the engine directory's included, byte-identical
afterwards.  Accepted debatable inputs are tested for what they do.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lego_model.checkpoints import save_checkpoint
from runtimes.outputs import read_png
from runtimes.sample import main
from tests.runtimes.conftest import export_onnx_dir, tiny_model

REPO = Path(__file__).resolve().parents[2]


def snapshot(*roots: Path) -> dict[Path, bytes]:
    """Every file under ``roots`` with its bytes."""
    return {p: p.read_bytes() for root in roots if root.exists() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(*args: str):
    return CliRunner().invoke(main, ["--quiet", "--threads", "1", *args], catch_exceptions=False)


def refused(result, pattern: str) -> str:
    """One ``error:`` line, exit 1 (a project error) or 2 (an option value click's type refused)."""
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def engines_nan(tmp_path_factory) -> Path:
    """fp32 ONNX engines of tiny_PR_16 whose brick 1 outputs NaN (a damaged checkpoint exported as is)."""
    model = tiny_model("tiny_PR_16")
    with torch.no_grad():
        model.bricks[1].final_layer.linear.bias.fill_(float("nan"))
    return export_onnx_dir(model, tmp_path_factory.mktemp("engines_nan"))


# ---------------------------------------------------------------- options refused before any compute

OPTIONS = {
    "seed range of 10^11": (["--seeds", "0-99999999999"], "seed 99999999999 is out of range"),
    "seed count beyond the limit": (["--seeds", "0-1999999,3000000-3000001"], "2000002 seeds is more than the limit"),
    "seed beyond 2^32": (["--seeds", "4294967296"], "seed 4294967296 is out of range"),
    "seed range reaching past 2^32": (["--seeds", "4294967290-4294967300"], "out of range"),
    "duplicate seeds": (["--seeds", "1,1,1"], "seed 1 is given more than once"),
    "superscript digit seed": (["--seeds", "\u00b2"], "cannot parse seeds"),
    "5000-digit seed": (["--seeds", "0-" + "9" * 5000], "(5000 digits) is out of range"),
    "overlapping seed ranges": (["--seeds", "0-5,3-8"], "seed 3 is given more than once"),
    "threads beyond the cores": (["--threads", "100000"], "'--threads': 100000 is out of range (minimum 1"),
    "negative guidance": (["--cfg-scale", "-1", "--class", "1"], "'--cfg-scale': cannot parse '-1'"),
    "guidance beyond float32": (["--cfg-scale", "1e300", "--class", "1"], "1e300 is outside [0, 100]"),
    "NaN guidance": (["--cfg-scale", "nan", "--class", "1"], "'--cfg-scale': cannot parse 'nan'"),
    "infinite guidance": (["--cfg-scale", "inf"], "'--cfg-scale'"),
    "NaN churn": (["--S-churn", "nan"], "'--S-churn': cannot parse 'nan'"),
    "infinite churn": (["--S-churn", "inf"], "--S-churn': inf is not a finite number"),
    "NaN churn noise": (["--S-churn", "1", "--S-noise", "nan"], "'--S-noise': cannot parse 'nan'"),
    "churn range backwards": (["--S-churn", "1", "--S-min", "5", "--S-max", "1"], "0 <= S_min <= S_max"),
    "--config with engines": (["--config", "tiny_PG_16"], "--config does not apply to the"),
    "out under a file": (["--out", "{tmp}/file/sub"], "is not a directory"),
    "npz under a file": (["--npz", "{tmp}/file/x.npz"], "is not a directory"),
    "out is a dangling symlink": (["--out", "{tmp}/dangling"], "dangling is not a directory"),
    "out inside the engine directory": (["--out", "{engines}/samples"], "inside the engine directory"),
    "out is the engine directory": (["--out", "{engines}"], "inside the engine directory"),
    "npz onto the manifest": (["--npz", "{engines}/manifest.json"], "inside the engine directory"),
    "npz onto a user file": (["--npz", "{tmp}/keep.npz"], "already exists and is not this run's npz"),
    "npz onto a PNG of the run": (["--npz", "{tmp}/out/000001.png"], "would overwrite this run's own 000001.png"),
    "npz onto run.json": (["--npz", "{tmp}/out/run.json"], "would overwrite this run's own run.json"),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_bad_options_are_refused_in_one_line_and_touch_nothing(name, engines_pg, tmp_path):
    args, pattern = OPTIONS[name]
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "keep.npz").write_bytes(b"the user's own file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    engines = tmp_path / "engines"
    shutil.copytree(engines_pg, engines)
    args = [a.format(tmp=tmp_path, engines=engines) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    before = snapshot(tmp_path)
    refused(run_cli("--engine-dir", str(engines), "--seeds", "0-1", "--steps", "2", *args), pattern)
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "out").exists(), "a refused run left an output directory behind"


def test_absurd_steps_are_a_usage_error_not_a_hang(engines_pg, tmp_path):
    result = CliRunner().invoke(main, ["--engine-dir", str(engines_pg), "--steps", "1000000000"])
    assert result.exit_code == 2 and "1000000000 is out of range (minimum 1, maximum 1000)" in result.output
    assert not (tmp_path / "samples").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the host-memory refusal of a CPU run (a GPU is visible)")
def test_huge_canvas_on_the_torch_backend_is_refused_by_its_memory_need(tmp_path):
    ckpt = save_checkpoint(tiny_model("tiny_PR_16"), tmp_path / "pr.safetensors")
    before = snapshot(tmp_path)
    refused(
        run_cli("--backend", "torch", "--checkpoint", str(ckpt), "--height", "8192", "--width", "8192",
                "--seeds", "0-1", "--out", str(tmp_path / "out")),
        "2 canvases of 8192x8192 need at least",
    )  # fmt: skip
    assert snapshot(tmp_path) == before


def test_read_only_output_directory_is_refused(engines_pg, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(run_cli("--engine-dir", str(engines_pg), "--out", str(ro / "out")), "cannot write to")
        assert not (ro / "out").exists()
    finally:
        ro.chmod(0o755)


def test_state_dict_checkpoint_asks_for_an_option_sample_has(tmp_path):
    ckpt = tmp_path / "sd.pt"
    torch.save(tiny_model("tiny_PR_16").state_dict(), ckpt)
    common = ["--backend", "torch", "--checkpoint", str(ckpt), "--seeds", "0", "--steps", "2"]
    refused(run_cli(*common, "--out", str(tmp_path / "a")), "name one (e.g. --config")
    result = run_cli(*common, "--config", "tiny_PR_16", "--out", str(tmp_path / "b"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "000000.png").is_file()


def test_eager_overflow_with_finite_weights_is_refused_naming_the_suspects(tmp_path):
    model = tiny_model("tiny_PG_16")
    with torch.no_grad():
        model.bricks[2].final_layer.linear.weight.mul_(1e37)  # finite, but its products overflow float32
    ckpt = save_checkpoint(model, tmp_path / "huge.safetensors")
    before = snapshot(tmp_path)
    line = refused(run_cli("--checkpoint", str(ckpt), "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "o")), "")
    assert "NaN/Inf" in line and "the weights are finite, so float overflowed" in line and "guidance" not in line
    assert snapshot(tmp_path) == before and not (tmp_path / "o").exists()


def test_eager_run_prints_its_cost_and_leaves_user_files_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_cli("--random-init", "--config", "tiny_PG_16", "--steps", "2", "--seeds", "0-1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "GFLOP per image" in result.output
    assert (out / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- resume with other settings, damaged outputs

# ONNX Runtime: auto would take OpenVINO, which computes bf16 where the CPU has bf16 units (run.json records it).
BASE = ["--backend", "onnxruntime-cpu", "--seeds", "0-3", "--steps", "2", "--batch", "2"]

CHANGED = {
    "steps": (["--steps", "3"], "steps 2 (this run: 3)"),
    "solver": (["--solver", "euler"], "solver heun (this run: euler)"),
    "class": (["--class", "4"], "class random (this run: 4)"),
    "guidance": (["--cfg-scale", "2"], "guidance off (this run: 2.0)"),
    "size": (["--height", "32"], "size 16x16 (this run: 32x16)"),
    "skip plan": (["--skip", "2@0.5:1"], "bricks per step [[0, 1, 2], [0, 1, 2]] (this run: [[0, 1, 2], [0, 1]])"),
    "churn": (["--S-churn", "1"], "churn off (this run:"),
    "model": (["--engine-dir", "{pr}"], "model tiny_PG_16 (this run: tiny_PR_16)"),
}


@pytest.mark.parametrize("name", CHANGED)
def test_resume_with_other_settings_names_the_first_difference(name, engines_pg, engines_pr, tmp_path):
    out = tmp_path / "out"
    assert run_cli("--engine-dir", str(engines_pg), *BASE, "--out", str(out)).exit_code == 0
    (out / "000003.png").unlink()  # an interrupted run
    args, pattern = CHANGED[name]
    args = [a.format(pr=engines_pr) for a in args]
    engine = [] if "--engine-dir" in args else ["--engine-dir", str(engines_pg)]
    before = snapshot(tmp_path)
    for resume in (["--resume"], []):  # a plain run into the same --out may not mix runs either
        refused(run_cli(*engine, *BASE, *args, "--out", str(out), *resume), pattern)
    assert snapshot(tmp_path) == before


def test_resume_refuses_damaged_pngs_naming_them(engines_pg, tmp_path):
    out = tmp_path / "out"
    args = ["--engine-dir", str(engines_pg), *BASE, "--out", str(out)]
    assert run_cli(*args).exit_code == 0
    good = (out / "000001.png").read_bytes()
    damages = {
        "000001.png": good[: len(good) // 2],  # truncated
        "000002.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40,  # garbage after the signature
    }
    for name, data in damages.items():
        (out / name).write_bytes(data)
        before = snapshot(tmp_path)
        refused(run_cli(*args, "--resume"), f"{out / name} cannot be decoded")
        assert snapshot(tmp_path) == before
        (out / name).write_bytes(good if name == "000001.png" else (out / "000000.png").read_bytes())
    # A complete PNG of another size or mode (copied in from elsewhere) is named too, not stacked into the npz.
    from lego_model.images import save_image

    save_image(np.zeros((32, 16, 1), np.uint8), out / "000002.png")
    refused(run_cli(*args, "--resume"), "000002.png is a 32x16 L image, this run writes 16x16 RGB")


def test_resume_at_another_size_is_refused_not_a_numpy_traceback(engines_pg, tmp_path):
    out, npz = tmp_path / "out", tmp_path / "all.npz"
    assert run_cli("--engine-dir", str(engines_pg), *BASE, "--out", str(out)).exit_code == 0
    before = snapshot(tmp_path)
    refused(
        run_cli("--engine-dir", str(engines_pg), *BASE, "--height", "32", "--width", "32", "--seeds", "0-5",
                "--out", str(out), "--npz", str(npz), "--resume"),
        "size 16x16 (this run: 32x32)",
    )  # fmt: skip
    assert snapshot(tmp_path) == before


def test_output_without_a_run_record_or_with_a_broken_one_is_refused(engines_pg, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "000000.png").write_bytes(b"someone else's picture")
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    args = ["--engine-dir", str(engines_pg), *BASE, "--out", str(out)]
    for resume in ([], ["--resume"]):
        refused(run_cli(*args, *resume), "but no run.json")
    (out / "000000.png").unlink()
    (out / "run.json").write_text("{not json")
    before = snapshot(tmp_path)
    refused(run_cli(*args, "--resume"), "run.json cannot be read")
    assert snapshot(tmp_path) == before
    (out / "run.json").unlink()
    assert run_cli(*args).exit_code == 0  # only unrelated files there: the run may write
    assert (out / "notes.txt").read_text() == "mine"


def test_npz_of_the_same_run_is_replaced_on_resume_and_a_changed_one_is_not(engines_pg, tmp_path):
    out, npz = tmp_path / "out", tmp_path / "all.npz"
    args = ["--engine-dir", str(engines_pg), *BASE, "--out", str(out), "--npz", str(npz)]
    assert run_cli(*args).exit_code == 0
    first = npz.read_bytes()
    result = run_cli(*args, "--resume", "--seeds", "0-5")  # more seeds, same settings: continues the run
    assert result.exit_code == 0, result.output
    assert "sampled 2 images (4 already there)" in result.stdout
    assert np.load(npz)["arr_0"].shape[0] == 6
    np.testing.assert_array_equal(np.load(npz)["arr_0"][:4], np.load(_bytes_file(tmp_path, first))["arr_0"])
    npz.write_bytes(b"replaced by the user")
    before = snapshot(tmp_path)
    refused(run_cli(*args, "--resume"), "already exists and is not this run's npz")
    assert snapshot(tmp_path) == before


def _bytes_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "first.npz"
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- NaN/Inf: what is known, and nothing left behind


def test_nonfinite_fp32_engine_names_engine_step_precision_not_fp16(engines_nan, tmp_path):
    out = tmp_path / "new" / "deep" / "out"
    line = refused(
        run_cli(
            "--engine-dir",
            str(engines_nan),
            "--backend",
            "onnxruntime-cpu",
            "--seeds",
            "0",
            "--steps",
            "3",
            "--out",
            str(out),
        ),
        "brick 1 (onnxruntime-cpu, fp32) produced NaN/Inf at sampling step 0 of 3",
    )
    # The engine file's initializers are read: the broken weight is named, not guessed at.
    assert "fp16" not in line and "its weight " in line and "holds NaN/Inf" in line and "likely" not in line
    assert not (tmp_path / "new").exists(), "a failed run left empty directories behind"


def test_nonfinite_torch_backend_names_the_broken_weight(tmp_path):
    model = tiny_model("tiny_PG_16")
    with torch.no_grad():
        model.model.t_embedder.mlp[2].bias.fill_(float("nan"))
    ckpt = save_checkpoint(model, tmp_path / "nan.safetensors")
    result = run_cli("--backend", "torch", "--checkpoint", str(ckpt), "--seeds", "0", "--steps", "2",
                     "--out", str(tmp_path / "out"))  # fmt: skip
    if "produced NaN/Inf" not in result.output:  # a checkpoint loader that refuses NaN tensors is as good
        refused(result, "")
        assert "nan" in result.stderr.lower() or "finite" in result.stderr.lower()
        return
    line = refused(result, "the embedder (torch, fp32) produced NaN/Inf at sampling step 0 of 2: its weight")
    assert "t_embedder" in line and "fp16" not in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- accepted debatable inputs


def test_huge_churn_is_accepted_and_saturates(engines_pg, tmp_path):
    # EDM caps gamma at sqrt(2) - 1 per step: S_churn 1e30 samples exactly as S_churn = steps (gamma 0.5 > cap).
    common = ["--engine-dir", str(engines_pg), "--seeds", "0-1", "--steps", "2"]
    for churn, name in (("1e30", "huge"), ("2", "capped")):
        assert run_cli(*common, "--S-churn", churn, "--out", str(tmp_path / name)).exit_code == 0
    for s in range(2):
        np.testing.assert_array_equal(
            read_png(tmp_path / "huge" / f"{s:06d}.png"), read_png(tmp_path / "capped" / f"{s:06d}.png")
        )


def test_guidance_zero_is_accepted(engines_pg, tmp_path):
    result = run_cli("--engine-dir", str(engines_pg), "--seeds", "0", "--steps", "2", "--cfg-scale", "0",
                     "--class", "2", "--out", str(tmp_path / "o"))  # fmt: skip
    assert result.exit_code == 0, result.output


def test_resume_may_switch_to_another_backend_of_the_same_precision(engines_pg, tmp_path):
    # Decision: backends of one precision agree to one uint8 level, so run.json does not compare the backend.
    out = tmp_path / "out"
    assert run_cli("--engine-dir", str(engines_pg), *BASE, "--out", str(out)).exit_code == 0
    (out / "000003.png").unlink()
    result = run_cli("--engine-dir", str(engines_pg), *BASE, "--backend", "torch", "--out", str(out), "--resume")
    assert result.exit_code == 0, result.output
    assert "sampled 1 images (3 already there)" in result.stdout
    assert json.loads((out / "run.json").read_text())["backend"] == "torch"


def test_run_record_holds_the_settings(engines_pg, tmp_path):
    out = tmp_path / "out"
    assert run_cli("--engine-dir", str(engines_pg), *BASE, "--class", "3", "--out", str(out)).exit_code == 0
    record = json.loads((out / "run.json").read_text())
    settings = record["settings"]
    assert settings["model"] == "tiny_PG_16" and settings["weights"] == "random init seed 0"
    assert settings["precision"] == "fp32" and settings["size"] == "16x16" and settings["class"] == 3
    assert settings["bricks per step"] == [[0, 1, 2], [0, 1, 2]] and record["backend"] == "onnxruntime-cpu"


# ---------------------------------------------------------------- a real SIGKILL, then --resume


def test_sigkilled_run_resumes_to_the_uninterrupted_images(engines_pg, tmp_path):
    out, npz = tmp_path / "killed", tmp_path / "killed.npz"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    settings = ["--engine-dir", str(engines_pg), "--seeds", "0-11", "--steps", "6", "--batch", "1"]
    args = [sys.executable, "-m", "runtimes.sample", "--quiet", "--threads", "1", *settings, "--npz", str(npz)]
    proc = subprocess.Popen([*args, "--out", str(out)], env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob("0*.png")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-500:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(out.glob("0*.png"))
    assert 0 < len(done) < 12 and not npz.exists()
    resumed = subprocess.run([*args, "--out", str(out), "--resume"], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"sampled {12 - len(done)} images ({len(done)} already there)" in resumed.stdout
    full = tmp_path / "full"
    assert run_cli(*settings, "--out", str(full)).exit_code == 0
    for s in range(12):
        np.testing.assert_array_equal(read_png(out / f"{s:06d}.png"), read_png(full / f"{s:06d}.png"))
    arr = np.load(npz)["arr_0"]
    assert arr.shape[0] == 12
    np.testing.assert_array_equal(arr[11], read_png(full / "000011.png"))
