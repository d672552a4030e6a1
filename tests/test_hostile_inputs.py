"""Issue 21, classes 1 and 3, through the command lines: numbers and plans from text, and snapshots that cost
without running code.

Every case is refused: a project error is exit code 1 and one ``error:`` line, a click option error is click's
usage error (exit code 2) with one ``Error:`` line naming the option; never a traceback, never a hang, and
nothing is written.  The CLIs run in-process (CliRunner, exceptions propagate: a traceback fails the test).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from export import cli as export_cli
from lego_model import LegoModel, get_config
from lego_model.checkpoints import save_checkpoint
from lego_model.digits import classifier as classifier_cli
from lego_model.digits import quality as quality_cli
from lego_model.digits import train as train_cli
from lego_model.flops import usable_cores
from runtimes.sample import main as sample_main

from .lego_model.test_checkpoints import HOSTILE_SNAPSHOTS, _write_snapshot

TINY = "tiny_PG_16"  # 3 bricks, 10 classes


def refused(result, *fragments: str) -> str:
    """A project error: exit 1, one ``error:`` line on stderr holding every fragment."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def usage_refused(result, option: str, *fragments: str) -> str:
    """A click option error: exit 2 and one ``error: Invalid value for OPTION`` line (lego_model.cli.OneLineCommand)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: Invalid value for '{option}'"), result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def invoke(main, *args: str | Path):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = LegoModel(get_config(TINY)).randomize_(0).eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


# Skip rules and presets: the issue's members and more of the class (other scripts' digits, signs, empty parts).
PLANS = {
    "Arabic-Indic brick": (["--skip", "\u0661@0:1"], "is not a brick index"),
    "superscript brick": (["--skip", "\u00b2@0:1"], "is not a brick index"),
    "Devanagari brick": (["--skip", "\u0967@0:1"], "is not a brick index"),
    "fullwidth brick": (["--skip", "\uff11@0:1"], "is not a brick index"),
    "underscored brick": (["--skip", "1_0@0:1"], "is not a brick index"),
    "Arabic-Indic fraction": (["--skip", "1@\u0660.\u0665:1"], "cannot parse FROM"),
    "nan fraction": (["--skip", "1@nan:1"], "cannot parse FROM 'nan'"),
    "empty fraction": (["--skip", "1@0:"], "cannot parse TO ''"),
    "preset with an empty fraction": (["--skip-preset", "global@"], "cannot parse F ''"),
    "preset with a fullwidth fraction": (["--skip-preset", "local@\uff10.\uff15"], "cannot parse F"),
    "preset beyond 1": (["--skip-preset", "global@1.5"], "F 1.5 is outside [0, 1]"),
    "Arabic-Indic seed": (["--seeds", "\u0661"], "cannot parse seeds"),
    "superscript seed range": (["--seeds", "0-\u00b2"], "cannot parse seeds"),
    "seed of 20 digits": (["--seeds", "1" + "0" * 20], "seed 100000000000000000000 is out of range"),
}


@pytest.mark.parametrize("case", PLANS)
def test_sample_refuses_plans_and_seeds(case, checkpoint, tmp_path):
    args, fragment = PLANS[case]
    out = tmp_path / "out"
    base = ["--quiet", "--threads", "1", "--backend", "torch", "--checkpoint", checkpoint, "--steps", "2"]
    refused(invoke(sample_main, *base, "--out", out, *args), fragment)
    assert not out.exists()


def test_sample_refuses_a_batch_of_21_digits(checkpoint, tmp_path):
    base = ["--quiet", "--threads", "1", "--backend", "torch", "--checkpoint", checkpoint, "--steps", "2"]
    result = CliRunner().invoke(sample_main, [*base, "--batch", "1" + "0" * 20, "--out", str(tmp_path / "o")])
    usage_refused(result, "--batch", "out of range")


EXPORT_RANGES = {
    "empty batch": ("--batch", "", "must be MIN:OPT:MAX"),
    "empty height": ("--height", "", "must be MIN:OPT:MAX"),
    "blank width": ("--width", "  ", "must be MIN:OPT:MAX"),
    "empty vae batch": ("--vae-batch", "", "--vae PATH"),  # refused for the missing --vae first
    "Devanagari batch": ("--batch", "\u0967:\u0967:\u096e", "must be MIN:OPT:MAX"),
    "fullwidth height": ("--height", "\uff11\uff16", "must be MIN:OPT:MAX"),
    "underscored batch": ("--batch", "1:1:1_6", "must be MIN:OPT:MAX"),
    "signed batch": ("--batch", "+1:1:8", "must be MIN:OPT:MAX"),
    "float batch": ("--batch", "1:1:8.0", "must be MIN:OPT:MAX"),
    "batch of 21 digits": ("--batch", "1:1:1" + "0" * 20, "--batch MAX 100000000000000000000 is out of range"),
    "height above its limit": ("--height", "16:16:16384", "--height MAX 16384 is out of range (minimum 0, maximum"),
}


@pytest.mark.parametrize("case", EXPORT_RANGES)
def test_export_refuses_ranges(case, tmp_path):
    option, value, fragment = EXPORT_RANGES[case]
    out = tmp_path / "e"
    result = invoke(export_cli.main, "--config", TINY, "--random-init", "--out", out, option, value)
    if option == "--vae-batch":
        assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output
    else:
        refused(result, fragment)
    assert not out.exists()


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--seed", "\u0661", "cannot parse '\u0661' as a whole number"),
        ("--seed", "1_0", "cannot parse '1_0'"),
        ("--seed", "", "cannot parse ''"),
        ("--opset", "\u0661\u0668", "cannot parse"),
        ("--opset", "1" + "0" * 20, "out of range (minimum 18, maximum 21)"),
    ],
)
def test_export_integer_options(option, value, fragment, tmp_path):
    out = tmp_path / "e"
    result = invoke(export_cli.main, "--config", TINY, "--random-init", "--out", out, option, value)
    usage_refused(result, option, fragment)
    assert not out.exists()


DIGITS_OPTIONS = {
    "train --steps in Arabic-Indic digits": (train_cli.main, ["--steps", "\u0664"], "--steps"),
    "train --seed of 2^64": (train_cli.main, ["--seed", str(2**64)], "--seed"),
    "train --seed -1": (train_cli.main, ["--seed", "-1"], "--seed"),
    "train --threads of a million": (train_cli.main, ["--threads", "1000000"], "--threads"),
    "train --batch-size of 21 digits": (train_cli.main, ["--batch-size", "1" + "0" * 20], "--batch-size"),
    "train --lr nan": (train_cli.main, ["--lr", "nan"], "--lr"),
    "train --lr inf": (train_cli.main, ["--lr", "inf"], "--lr"),
    "train --ema-decay nan": (train_cli.main, ["--ema-decay", "nan"], "--ema-decay"),
    "train --stop-after empty": (train_cli.main, ["--stop-after", ""], "--stop-after"),
    "quality --per-class in Devanagari": (quality_cli.main, ["--per-class", "\u0969\u0966"], "--per-class"),
    "quality --threads beyond the cores": (quality_cli.main, ["--threads", str(usable_cores() + 1)], "--threads"),
    "quality --steps 1_0": (quality_cli.main, ["--steps", "1_0"], "--steps"),
    "quality --cfg-scale nan": (quality_cli.main, ["--cfg-scale", "nan"], "--cfg-scale"),
    "classifier --epochs superscript": (classifier_cli.main, ["--epochs", "\u00b2"], "--epochs"),
    "classifier --seed of 2^70": (classifier_cli.main, ["--seed", str(2**70)], "--seed"),
}


@pytest.mark.parametrize("case", DIGITS_OPTIONS)
def test_digits_commands_refuse_numbers_before_doing_anything(case, tmp_path):
    main, args, option = DIGITS_OPTIONS[case]
    extra = ["--out", str(tmp_path / "m.safetensors")] if main is not quality_cli.main else []
    usage_refused(CliRunner().invoke(main, [*extra, *args], catch_exceptions=False), option)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ class 3: snapshots every loading CLI refuses

SNAPSHOTS = ["diamond of 48 levels", "cycle", "chain 5,000 deep", "wide: 3 million objects", "bytes declared 2^60 long"]


def _snapshot(tmp_path: Path, name: str) -> Path:
    make, _ = HOSTILE_SNAPSHOTS[name]
    path = tmp_path / "network-snapshot-000000.pkl"
    path.write_bytes(make())
    return path


@pytest.mark.parametrize("name", SNAPSHOTS)
def test_every_cli_refuses_costly_snapshots_in_one_line(name, tmp_path):
    path = _snapshot(tmp_path, name)
    fragment = HOSTILE_SNAPSHOTS[name][1]
    refused(invoke(sample_main, "--checkpoint", path, "--out", tmp_path / "g"), fragment)
    refused(invoke(export_cli.main, "--checkpoint", path, "--out", tmp_path / "e", "-q"), fragment)
    base = ["--quiet", "--threads", "1", "--backend", "torch", "--steps", "2"]
    refused(invoke(sample_main, *base, "--checkpoint", path, "--out", tmp_path / "s"), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_real_layout_snapshot_still_samples(tmp_path, snapshot_modules):
    """The bounded unpickler reads a real-layout snapshot end to end: runtimes.sample samples from it."""
    path = tmp_path / "network-snapshot-000100.pkl"
    _write_snapshot(LegoModel(get_config(TINY)).randomize_(1).eval(), path, module_src="")
    result = invoke(sample_main, "--checkpoint", path, "--seeds", "0-1", "--steps", "2", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "000001.png").is_file()
