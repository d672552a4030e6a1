"""python -m lego_model.generate as a hostile user drives it (issue 10).

Refused cases: exit code 1, one line starting with ``error:``, no traceback
(in-process, exceptions propagate), pre-existing files byte-identical, and no
output directory left behind.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from lego_model import LegoModel, get_config
from lego_model.checkpoints import save_checkpoint
from lego_model.eager import sample_images
from lego_model.errors import LegoError, NonFiniteError
from lego_model.generate import main
from lego_model.images import parse_seeds
from lego_model.sampler import StackedRandomGenerator

TINY = ["--random-init", "--config", "tiny_PG_16", "--steps", "2"]


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(result, pattern: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()  # stdout may hold the plan printed before sampling
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert pattern in lines[0], lines[0]
    return lines[0]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def nan_checkpoint(tmp_path):
    model = LegoModel(get_config("tiny_PG_16")).randomize_(0).eval()
    with torch.no_grad():
        model.bricks[2].final_layer.linear.bias.fill_(float("nan"))
    return model, save_checkpoint(model, tmp_path / "nan.safetensors")


CASES = {
    "seed range of 10^11": (["--seeds", "0-99999999999"], "seed 99999999999 is out of range"),
    "seed count beyond the limit": (["--seeds", "0-1000000"], "1000001 seeds is more than the limit of 1000000"),
    "seed beyond 2^32": (["--seeds", "4294967296"], "out of range"),
    "duplicate seeds": (["--seeds", "1,1,1"], "seed 1 is given more than once"),
    "negative guidance": (["--cfg-scale", "-0.5"], "guidance scale -0.5 is outside 0..100"),
    "huge guidance": (["--cfg-scale", "1e300"], "guidance scale 1e+300 is outside 0..100"),
    "NaN guidance": (["--cfg-scale", "nan"], "guidance scale nan"),
    "out under a file": (["--out", "{tmp}/file/out"], "is not a directory"),
    "out is a file's child, deeper": (["--out", "{tmp}/file/a/b/c"], "is not a directory"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_options_are_refused_before_sampling(name, tmp_path):
    args, pattern = CASES[name]
    (tmp_path / "file").write_text("not a directory")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    before = snapshot(tmp_path)
    result = invoke(*TINY, *args)
    refused(result, pattern)
    assert "skip plan" not in result.output  # printed just before sampling: refused earlier
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_read_only_output_is_refused_before_the_model_loads(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(invoke(*TINY, "--out", str(ro / "out")), "cannot write to")
    finally:
        ro.chmod(0o755)


def test_nan_weights_are_refused_and_write_nothing(tmp_path):
    model, ckpt = nan_checkpoint(tmp_path)
    out = tmp_path / "new" / "out"
    before = snapshot(tmp_path)
    result = invoke("--checkpoint", str(ckpt), "--seeds", "0-1", "--steps", "2", "--out", str(out))
    line = refused(result, "")
    assert "nan" in line.lower() or "finite" in line.lower()  # at load (a validating loader) or after sampling
    assert snapshot(tmp_path) == before and not (tmp_path / "new").exists()
    # The library itself refuses, naming the step and the broken weight (whatever the loader does).
    with pytest.raises(NonFiniteError, match=r"eager model \(tiny_PG_16, float32\) produced NaN/Inf at sampling step 0 "
                       r"of 2: its weight model.model.2.final_layer.linear.bias holds NaN/Inf"):  # fmt: skip
        sample_images(model, [0], height=16, width=16, num_steps=2)


def test_overflow_with_finite_weights_is_refused_naming_the_suspects(tmp_path):
    model = LegoModel(get_config("tiny_PG_16")).randomize_(0).eval()
    with torch.no_grad():
        model.bricks[2].final_layer.linear.weight.mul_(1e37)  # finite, but its products overflow float32
    with pytest.raises(NonFiniteError, match=r"step 0 of 2: the weights are finite, so float overflowed; suspects: "
                       r"weights of extreme magnitude \(check the checkpoint\), the guidance scale 4"):  # fmt: skip
        sample_images(model, [0], height=16, width=16, num_steps=2, class_idx=1, cfg_scale=4.0)
    ckpt = save_checkpoint(model, tmp_path / "huge.safetensors")
    before = snapshot(tmp_path)
    line = refused(invoke("--checkpoint", str(ckpt), "--seeds", "0", "--steps", "2", "--out", str(tmp_path / "o")), "")
    assert "NaN/Inf" in line and "suspects: weights of extreme magnitude" in line and "guidance" not in line
    assert snapshot(tmp_path) == before and not (tmp_path / "o").exists()


def test_4096_square_batch_is_refused_when_it_cannot_fit(tmp_path, monkeypatch):
    import lego_model.flops as flops

    monkeypatch.setattr(flops, "available_memory", lambda: 8 * 2**30)
    result = invoke(*TINY, "--height", "4096", "--width", "4096", "--out", str(tmp_path / "o"))
    refused(result, "16 canvases of 4096x4096 need at least")
    assert "sample fewer seeds per run or a smaller size" in result.output and not (tmp_path / "o").exists()


def test_every_run_prints_its_cost(tmp_path):
    result = invoke(*TINY, "--seeds", "0-1", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert "GFLOP per image" in result.output and "activations at least" in result.output


def test_existing_user_files_in_out_survive(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert invoke(*TINY, "--seeds", "0", "--out", str(out)).exit_code == 0
    assert (out / "notes.txt").read_text() == "mine"


def test_seed_parsing_and_generator_range():
    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    assert parse_seeds(f"{2**32 - 1}") == [2**32 - 1]
    with pytest.raises(LegoError, match="seed 3 is given more than once"):
        parse_seeds("0-5,3")
    with pytest.raises(LegoError, match="out of range"):
        StackedRandomGenerator([2**32])  # the authors' modulo would give seed 0's image
