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

from .fakes.disk import full_disk
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
    "height above its limit": ("--height", "16:16:16384", "--height MAX 16384 is out of range (minimum 1, maximum"),
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


# ------------------------------------------------------------------ issue 21, class 2: paths of every command

# (command, the options that make a run, the path options to try); every command and every path option.
_TRAIN = (train_cli.main, ["--steps", "1"], ["--out", "--state"])
PATH_COMMANDS = {
    "sample": (sample_main, ["--config", TINY, "--random-init", "--steps", "1", "--seeds", "0"], ["--out", "--npz"]),
    "sample, eager inputs": (sample_main, ["--steps", "1", "--seeds", "0"], ["--checkpoint", "--engine-dir", "--vae"]),
    "lego-export": (export_cli.main, ["--config", TINY, "--random-init", "-q"], ["--out", "--cache-dir"]),
    "lego-export, inputs": (export_cli.main, ["-q"], ["--checkpoint", "--vae"]),
    "digits train": _TRAIN,
    "digits quality": (
        quality_cli.main,
        ["--per-class", "2", "--steps", "1"],
        ["--json", "--checkpoint", "--classifier"],
    ),
    "digits classifier": (classifier_cli.main, ["--epochs", "1"], ["--out"]),
}
BAD_PATHS = {
    "empty": (lambda d: "", "is empty"),
    "blank": (lambda d: "  ", "is blank"),
    "a name of 256 bytes": (lambda d: f"{d}/{'x' * 256}", "has a name of 256 bytes"),
    "a name of 256 bytes in 128 characters": (lambda d: f"{d}/{'é' * 128}/f", "has a name of 256 bytes"),
    "a path of 5,000 bytes": (lambda d: f"{d}/" + "/".join(["y" * 249] * 20), "bytes long as an absolute path"),
    "a symlink loop": (lambda d: f"{d}/loop/f", "runs through a symlink loop"),
}


@pytest.mark.parametrize("bad", BAD_PATHS)
@pytest.mark.parametrize("command", PATH_COMMANDS)
def test_every_path_option_refuses_paths_that_cannot_name_a_file(command, bad, tmp_path, monkeypatch):
    main, args, options = PATH_COMMANDS[command]
    make, fragment = BAD_PATHS[bad]
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    cwd = tmp_path / "cwd"  # '' would be the current directory
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assets = {p: p.read_bytes() for p in shipped_assets()}
    for option in options:
        line = usage_refused(invoke(main, *args, option, make(tmp_path)), option, fragment)
        assert len(line) < 300, line
    assert list(cwd.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "loop"]
    assert {p: p.read_bytes() for p in shipped_assets()} == assets  # classifier --out '' was the shipped file


def shipped_assets() -> list[Path]:
    from lego_model.shipped import ASSETS

    return sorted(p for p in ASSETS.iterdir() if p.is_file())


def test_sample_refuses_a_symlink_loop_inside_the_engine_directory(tmp_path):
    from tests.runtimes.conftest import export_onnx_dir, tiny_model

    engines = export_onnx_dir(tiny_model(TINY), tmp_path / "eng")
    (engines / "loop").symlink_to(engines / "loop")
    before = {p: p.read_bytes() for p in engines.iterdir() if p.is_file()}
    base = ["--quiet", "--threads", "1", "--engine-dir", engines, "--seeds", "0", "--steps", "1"]
    for args in (["--out", engines / "loop" / "s"], ["--out", tmp_path / "o", "--npz", engines / "loop" / "x.npz"]):
        usage_refused(invoke(sample_main, *base, *args), args[-2], "runs through a symlink loop")
    refused(invoke(sample_main, *base, "--out", engines / "s"), "lies inside the engine directory")
    link = tmp_path / "link"
    link.symlink_to(engines)
    refused(invoke(sample_main, *base, "--out", tmp_path / "o", "--npz", link / "x.npz"), "inside the engine directory")
    assert {p: p.read_bytes() for p in engines.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in engines.iterdir() if not p.is_file()) == ["loop"]
    assert not (tmp_path / "o").exists()
    # A loop elsewhere in the engine directory is no reason to refuse: it is not on a path the run uses.
    result = invoke(sample_main, *base, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------ issue 21, class 7: digits commands, full disks


@pytest.mark.parametrize("room", [0, 5000, 200_000])
def test_train_onto_a_full_disk_keeps_the_old_model_and_leaves_no_temporary(room, tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="the digits data need scikit-learn (the data extra)")
    out = tmp_path / "m.safetensors"
    args = ("--out", out, "--steps", "2", "--batch-size", "2", "--warmup-steps", "1")
    assert invoke(train_cli.main, *args, "--stop-after", "1").exit_code == 0  # a model and its state, to resume
    old = out.read_bytes()
    full_disk(monkeypatch, tmp_path, room)
    result = invoke(train_cli.main, "--out", out, "--resume")  # rewrites its model: onto the full disk
    monkeypatch.undo()
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]  # its progress bar
    assert len(lines) == 1 and lines[0].startswith("error: writing "), result.stderr
    assert "failed: Error while serializing: I/O error: No space left on device" in lines[0]
    assert out.read_bytes() == old
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left in (["m.safetensors"], ["m.safetensors", "m.state.safetensors"]), left  # the state, when whole
    if len(left) == 2:
        train_cli.load_state(tmp_path / "m.state.safetensors")


@pytest.mark.parametrize("room", [0, 100])
def test_quality_json_onto_a_full_disk_is_one_line_and_no_file(room, tmp_path, monkeypatch):
    full_disk(monkeypatch, tmp_path, room)
    result = invoke(quality_cli.main, "--per-class", "2", "--steps", "1", "--plan", "full stack", "--json",
                    tmp_path / "q.json")  # fmt: skip
    monkeypatch.undo()
    refused(result, "q.json failed: No space left on device; nothing was written under that name")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ issue 21, class 6: Ctrl-C while a command starts

STARTING = {
    "lego-export": ["-m", "export", "--config", TINY, "--random-init", "-q", "--out", "{tmp}/e"],
    "digits train": ["-m", "lego_model.digits.train", "--out", "{tmp}/m.safetensors", "--steps", "50"],
    "digits quality": ["-m", "lego_model.digits.quality", "--per-class", "2", "--json", "{tmp}/q.json"],
    "runtimes": ["-m", "runtimes", "--config", TINY, "--random-init", "--out", "{tmp}/o"],
}


@pytest.mark.parametrize("command", STARTING)
def test_ctrl_c_while_a_command_imports_its_libraries_is_one_line(command, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [a.format(tmp=tmp_path) for a in STARTING[command]]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *args], env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    time.sleep(0.3)  # Python has started; torch is loading (about a second or more)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: "), err
    assert list(tmp_path.iterdir()) == []
