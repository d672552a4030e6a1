"""runtimes.outputs and python -m runtimes.sample against issue 21's classes 5 to 8: run.json, leftovers,
interruptions, full disks and two runs at once.

Members of each class, not only the issue's examples.  A full disk is simulated by an ``open`` that lets a
given number of bytes through and then raises ENOSPC mid-file (:func:`full_disk`); runs that must overlap,
be interrupted or be killed are real subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lego_model.errors import OutputError
from runtimes.outputs import LOCK_FILE, RUN_FILE, RunOutputs, first_difference, hold_outputs, read_png, write_png
from runtimes.sample import main
from tests.fakes.disk import full_disk

REPO = Path(__file__).resolve().parents[2]
TINY = ["--config", "tiny_PG_16", "--random-init"]
SETTINGS = {"model": "tiny_PG_16", "weights": "random init seed 0", "steps": 3, "class": 1, "bricks per step": [[0]]}


def run_cli(*args: str | Path):
    return CliRunner().invoke(main, ["--quiet", "--threads", "1", *map(str, args)], catch_exceptions=False)


def one_line(result, prefix: str = "error: ") -> str:
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    return lines[0]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}


def assert_whole(folder: Path) -> None:
    """Every file under a final name is complete, and no temporary is left."""
    for p in folder.iterdir():
        assert not p.name.startswith(".") or p.name == LOCK_FILE, f"left behind: {p.name}"
        if p.suffix == ".png":
            read_png(p)
        elif p.name == RUN_FILE:
            json.loads(p.read_text())
        elif p.suffix in (".npz", ".npy"):
            np.load(p)


# ------------------------------------------------------------------ class 5: run.json


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("3", 3, 'steps "3", text (this run: 3, a whole number)'),
        (3, "3", 'steps 3, a whole number (this run: "3", text)'),
        (3.0, 3, "steps 3.0 (this run: 3)"),
        (True, 1, "steps true (this run: 1)"),
        ("None", None, "steps None (this run: null)"),
        ("null", None, 'steps "null", text (this run: null, null)'),
        ([3], "[3]", 'steps [3], a list (this run: "[3]", text)'),
        ("fp32 ", "fp32", "steps fp32  (this run: fp32)"),
    ],
)
def test_first_difference_compares_types_and_shows_them_when_values_print_alike(old, new, message):
    assert first_difference({"steps": old}, {"steps": new}) == message


def test_first_difference_names_a_missing_setting_and_passes_equal_ones():
    assert first_difference({"steps": 3}, {"steps": 3, "class": None}) == "class missing (this run: null)"
    assert first_difference(dict(SETTINGS), dict(SETTINGS)) is None


def test_first_difference_names_the_entry_where_two_long_lists_part():
    full = [[0, 1, 2]] * 18
    late = full[:9] + [[0, 1]] * 9
    assert first_difference({"bricks per step": full}, {"bricks per step": late}) == (
        "bricks per step, entry 9 of 18 (from 0): [0, 1, 2] (this run: [0, 1])"
    )
    assert first_difference({"bricks per step": full}, {"bricks per step": full[:12]}) == (
        "bricks per step: 18 entries (this run: 12)"
    )
    assert first_difference({"size": [16, 16]}, {"size": [16, 32]}) == "size [16, 16] (this run: [16, 32])"


HOSTILE_RECORDS = {
    "lists nested 100,000 deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "objects nested 100,000 deep": ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
    "settings nested 50,000 deep": (
        '{"format": "lego-sample-run/1", "settings": {"steps": ' + "[" * 50_000 + "]" * 50_000 + "}}",
        "nested too deeply",
    ),
    "a 5,000-digit number": (
        '{"format": "lego-sample-run/1", "settings": {"steps": ' + "9" * 5000 + "}}",
        "5000 digits",
    ),
    "a 5,000-digit negative number": ("-" + "1" * 5000, "5000 digits"),
    "1e999": ('{"format": "lego-sample-run/1", "settings": {"steps": 1e999}}', "not finite"),
    "NaN": ('{"format": "lego-sample-run/1", "settings": {"steps": NaN}}', "NaN, which is not a JSON number"),
    "-Infinity": ('{"steps": -Infinity}', "-Infinity, which is not a JSON number"),
    "17 MB": (" " * (17 << 20) + "{}", "over 16777216 bytes"),
    "not UTF-8": (b'{"format": "\xff"}', "cannot be read (not JSON"),
    "truncated": ('{"format": "lego-sample-run/1", "sett', "cannot be read (not JSON"),
    "not a record": ("[]", "is not a lego-sample-run/1 record"),
}


@pytest.mark.parametrize("name", HOSTILE_RECORDS)
def test_hostile_run_records_are_refused_in_one_line(name, tmp_path):
    text, fragment = HOSTILE_RECORDS[name]
    out = tmp_path / "out"
    out.mkdir()
    record = out / RUN_FILE
    record.write_bytes(text if isinstance(text, bytes) else text.encode())
    outputs = RunOutputs(out, None, dict(SETTINGS), "torch")
    with pytest.raises(OutputError, match="choose another --out") as info:
        outputs.check([0], resume=True, height=16, width=16, channels=3, engine_dir=None)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == [RUN_FILE]


def test_a_record_whose_values_print_alike_is_refused_showing_the_types(tmp_path):
    out = tmp_path / "out"
    assert run_cli(*TINY, "--seeds", "0-1", "--steps", "3", "--out", out).exit_code == 0
    record = json.loads((out / RUN_FILE).read_text())
    record["settings"]["steps"] = "3"
    (out / RUN_FILE).write_text(json.dumps(record))
    line = one_line(run_cli(*TINY, "--seeds", "0-1", "--steps", "3", "--out", out, "--resume"))
    assert 'steps "3", text (this run: 3, a whole number)' in line


def test_a_record_with_an_unbounded_churn_resumes(tmp_path):
    """S_max's default is inf, which json writes as Infinity: the reader takes it back (and only it)."""
    args = [*TINY, "--seeds", "0-1", "--steps", "2", "--S-churn", "1", "--out", tmp_path / "o"]
    assert run_cli(*args).exit_code == 0
    assert "Infinity" in (tmp_path / "o" / RUN_FILE).read_text()
    result = run_cli(*args, "--resume")
    assert result.exit_code == 0 and "(2 already there)" in result.stdout, result.output


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_run_record_has_the_mode_of_the_images(umask, tmp_path):
    old = os.umask(umask)
    try:
        result = run_cli(*TINY, "--seeds", "0-1", "--steps", "1", "--out", tmp_path / "o", "--npz", tmp_path / "o.npz")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    modes = {p.name: p.stat().st_mode & 0o777 for p in [*(tmp_path / "o").iterdir(), tmp_path / "o.npz"]}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_a_run_removes_the_temporaries_killed_runs_left_and_nothing_else(tmp_path):
    out, npz = tmp_path / "out", tmp_path / "x.npz"
    assert run_cli(*TINY, "--seeds", "0-3", "--steps", "2", "--out", out).exit_code == 0
    stale = [".000003.tmp.png", ".000100.tmp.png", ".grid.tmp.png", ".run-abc123.json", ".000002.tmp.npy",
             ".latents.npz.tmp", ".000001.tmp-0123abcd.png", ".run.tmp-89abcdef.json"]  # fmt: skip
    mine = [".notes.tmp", ".my.png", ".000003.png.bak", ".x.tmp"]  # hidden, but not names a run writes
    for name in stale + mine:
        (out / name).write_bytes(b"half")
    beside = {".x.npz.tmp": True, ".x.tmp-0123abcd.npz": True, ".y.tmp-0123abcd.npz": False}
    for name in beside:
        (tmp_path / name).write_bytes(b"half")
    result = run_cli(*TINY, "--seeds", "0-3", "--steps", "2", "--out", out, "--npz", npz, "--resume")
    assert result.exit_code == 0, result.output
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert hidden == sorted(mine)
    assert {name: (tmp_path / name).exists() for name in beside} == {n: not gone for n, gone in beside.items()}


# ------------------------------------------------------------------ class 7: full disks


# 16x16 PNGs of tiny_PG_16 are about 280 bytes and run.json about 900: the disk fills at run.json, in the
# first PNG, further on, in grid.png or in the npz.
@pytest.mark.parametrize("room", [0, 500, 1200, 1600, 2400, 3300, 5000, 9000])
def test_a_full_disk_leaves_complete_files_or_none_and_no_temporary(room, tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    disk.mkdir()
    out, npz = disk / "out", disk / "all.npz"
    (disk / "mine.txt").write_text("the user's")
    full_disk(monkeypatch, disk, room)
    result = run_cli(*TINY, "--seeds", "0-7", "--steps", "1", "--batch", "2", "--out", out, "--npz", npz)
    monkeypatch.undo()
    if result.exit_code != 0:
        line = one_line(result)
        assert "failed: No space left on device; nothing was written under that name" in line, line
        assert not npz.exists()
    assert_whole(disk)
    if out.exists():
        assert_whole(out)
    assert (disk / "mine.txt").read_text() == "the user's"


def test_a_full_disk_on_resume_keeps_the_images_already_there(tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_cli(*TINY, "--seeds", "0-3", "--steps", "1", "--out", out).exit_code == 0
    before = files(out)
    (out / "000002.png").unlink()
    full_disk(monkeypatch, tmp_path, len(before[RUN_FILE]) + 100)  # run.json (rewritten alike), then 100 bytes
    result = run_cli(*TINY, "--seeds", "0-3", "--steps", "1", "--out", out, "--resume")
    monkeypatch.undo()
    assert "000002.png failed: No space left on device" in one_line(result)
    assert files(out) == {k: v for k, v in before.items() if k != "000002.png"}


@pytest.mark.parametrize("room", [0, 200, 2000])
def test_a_full_disk_writing_latents_leaves_no_half_file(room, tmp_path, monkeypatch):
    out = tmp_path / "lat"
    full_disk(monkeypatch, tmp_path, room + 900)  # run.json first
    result = run_cli("--config", "tiny_latent_PG_8", "--random-init", "--seeds", "0-9", "--steps", "1", "--out", out)
    monkeypatch.undo()
    assert result.exit_code == 1 and "No space left on device" in one_line(result)
    assert_whole(out)


def test_write_png_onto_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "000001.png"
    path.write_bytes(b"old")
    full_disk(monkeypatch, tmp_path, 40)
    with pytest.raises(OutputError, match="writing .*000001.png failed: No space left on device"):
        write_png(np.zeros((16, 16, 3), np.uint8), path)
    monkeypatch.undo()
    assert files(tmp_path) == {"000001.png": b"old"}


# ------------------------------------------------------------------ class 8: two runs at once


def test_hold_outputs_refuses_a_second_holder_of_the_out_or_the_npz(tmp_path):
    out, npz = tmp_path / "o", tmp_path / "x.npz"
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path)
    with hold_outputs(out, npz):
        with pytest.raises(OutputError, match=rf"--out .*o is being written by another run \(pid {os.getpid()}"):
            with hold_outputs(out, None):
                pass
        for spelling in (npz, tmp_path / "sub" / ".." / "x.npz", tmp_path / "link" / "x.npz"):
            with pytest.raises(OutputError, match="--npz .* is being written by another run"):
                with hold_outputs(tmp_path / "other", spelling):
                    pass
        assert not (tmp_path / "other").exists()  # the refused run made nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "sub"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _start(*args: str | Path) -> subprocess.Popen:
    """A slow run of runtimes.sample, Ctrl-C delivered as from a terminal (whatever the test runner ignores)."""
    cmd = [sys.executable, "-m", "runtimes.sample", "--quiet", "--threads", "1", *TINY, *map(str, args)]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def _wait_for(proc: subprocess.Popen, ready, what: str, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before {what}: " + proc.stderr.read()[-500:]


def _pngs(out: Path) -> int:
    return len(list(out.glob("0*.png"))) if out.is_dir() else 0


SLOW = ["--seeds", "0-299", "--batch", "1", "--steps", "6"]


@pytest.mark.parametrize(
    "second",
    [
        ["--steps", "5"],  # other settings: would mix two runs under one run.json
        ["--steps", "6"],  # the same: would sample the same seeds twice
        ["--steps", "6", "--resume"],
        ["--steps", "6", "--out", "{tmp}/o2", "--npz", "{tmp}/x.npz"],  # same npz, other --out
        ["--steps", "6", "--out", "{tmp}/o3", "--npz", "{tmp}/sub/../x.npz"],  # the same npz, spelt otherwise
        ["--steps", "6", "--out", "{tmp}/o2", "--npz", "{tmp}/o/y.npz"],  # into the first's --out
    ],
)
def test_a_second_run_is_refused_naming_the_first(second, tmp_path):
    out = tmp_path / "o"
    (tmp_path / "sub").mkdir()
    first = _start(*SLOW, "--out", out, "--npz", tmp_path / "x.npz")
    try:
        _wait_for(first, lambda: _pngs(out) >= 1, "its first image")
        args = [a.format(tmp=tmp_path) for a in second]
        if "--out" not in args:
            args += ["--out", str(out)]
        line = one_line(run_cli(*TINY, "--seeds", "0-299", "--batch", "1", *args))
        assert f"another run (pid {first.pid}: python" in line and "runtimes.sample" in line
        assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
    finally:
        first.kill()
        first.wait()


def test_after_kill_9_the_next_run_proceeds_and_the_images_equal_an_uninterrupted_run(tmp_path):
    out = tmp_path / "o"
    first = _start("--seeds", "0-39", "--batch", "1", "--steps", "4", "--out", out)
    _wait_for(first, lambda: _pngs(out) >= 2, "two images")
    first.kill()
    first.wait()
    assert (out / LOCK_FILE).exists()  # its file stays; the kernel dropped its lock
    (out / ".000039.tmp-0123abcd.png").write_bytes(b"half")  # as a kill mid-write leaves it
    result = run_cli(*TINY, "--seeds", "0-39", "--batch", "8", "--steps", "4", "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    full = tmp_path / "full"
    assert run_cli(*TINY, "--seeds", "0-39", "--steps", "4", "--out", full).exit_code == 0
    # The killed run sampled at batch 1, the resumed one at batch 8: fp32 sums in another order may move a
    # pixel by one uint8 level (README: the batch may change, fp32 agrees to one level), never more.
    for s in range(40):
        diff = np.abs(read_png(out / f"{s:06d}.png").astype(int) - read_png(full / f"{s:06d}.png").astype(int))
        assert diff.max() <= 1, f"seed {s}: the resumed run differs from an uninterrupted one by {diff.max()} levels"


def test_two_runs_started_together_into_one_out_do_not_both_succeed(tmp_path):
    out = tmp_path / "o"
    runs = [_start("--seeds", "0-63", "--batch", "1", "--steps", str(steps), "--out", out) for steps in (3, 4)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    refused = next(err for code, err in results if code == 1)
    assert refused.startswith("error: ") and len(refused.strip().splitlines()) == 1, refused
    # Held by the other (or, had it finished before this one started, its run.json's other steps).
    assert "is being written by another run (pid" in refused or "holds a run with steps" in refused
    record = json.loads((out / RUN_FILE).read_text())
    winner = 3 if results[0][0] == 0 else 4
    assert record["settings"]["steps"] == winner and _pngs(out) == 64


# ------------------------------------------------------------------ class 6: Ctrl-C


def _interrupt(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


# From 0.2 s on: before, Python itself may still be starting (its own handler is not installed yet).
@pytest.mark.parametrize("delay", [0.2, 0.6, 1.2, 2.5])
def test_ctrl_c_while_starting_or_loading_is_one_line(delay, tmp_path):
    out = tmp_path / "o"
    proc = _start(*SLOW, "--out", out)
    time.sleep(delay)
    code, err = _interrupt(proc)
    assert "Traceback" not in err and code in (130, -signal.SIGINT), err
    lines = err.strip().splitlines()
    assert len(lines) <= 1, err  # none: the signal came before Python started
    if lines:
        assert lines[0].startswith("interrupted: "), err
        kept = _pngs(out)
        if kept:
            assert f"{kept} of 300 images kept in {out}; run the same command with --resume" in lines[0]
        else:
            assert "nothing was written" in lines[0] or "no images were written" in lines[0], lines[0]


@pytest.mark.parametrize("images", [1, 5])
def test_ctrl_c_while_sampling_says_what_was_kept_and_resume_finishes_it(images, tmp_path):
    out = tmp_path / "o"
    args = ["--seeds", "0-29", "--batch", "1", "--steps", "4", "--out", out]
    proc = _start(*args)
    _wait_for(proc, lambda: _pngs(out) >= images, f"{images} images")
    code, err = _interrupt(proc)
    kept = _pngs(out)
    assert code == 130 and err == (
        f"interrupted: {kept} of 30 images kept in {out}; run the same command with --resume to sample the other "
        f"{30 - kept}\n"
    )
    assert_whole(out)
    resumed = run_cli(*TINY, *args, "--resume")
    assert resumed.exit_code == 0 and f"({kept} already there)" in resumed.stdout
    full = tmp_path / "full"
    assert run_cli(*TINY, *args[:-1], full).exit_code == 0
    for s in range(30):
        np.testing.assert_array_equal(read_png(out / f"{s:06d}.png"), read_png(full / f"{s:06d}.png"))
