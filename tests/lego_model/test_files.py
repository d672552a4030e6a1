"""lego_model.files: the one path check, whole files (atomic_path), locks (hold) and temporaries (issue 21,
classes 2, 5, 7, 8)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from lego_model.errors import OutputError
from lego_model.files import (
    NAME_MAX,
    PATH_MAX,
    CheckedPath,
    atomic_path,
    check_path,
    check_writable,
    hold,
    holder_of,
    resolved,
    temporary_of,
    write_atomic,
)

# ------------------------------------------------------------------ class 2: paths that cannot name a file


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: "", "--out is empty"),
        (lambda d: " ", "--out is blank"),
        (lambda d: "\t ", "--out is blank"),
        (lambda d: f"{d}/{'x' * (NAME_MAX + 1)}", f"a name of {NAME_MAX + 1} bytes"),
        (lambda d: f"{d}/{'é' * 128}/s", "a name of 256 bytes"),  # 128 characters, 256 bytes in UTF-8
        (lambda d: f"{d}/ok/{'n' * 1000}.npz", "a name of 1004 bytes"),
        (lambda d: f"{d}/" + "/".join(["y" * 200] * 21), "bytes long as an absolute path"),
        (lambda d: "/".join(["z" * 250] * 20), "bytes long as an absolute path"),  # relative: made absolute
    ],
)
def test_check_path_refuses_what_cannot_name_a_file(make, fragment, tmp_path):
    with pytest.raises(OutputError, match=fragment) as info:
        check_path(make(tmp_path), "--out")
    message = str(info.value)
    assert "\n" not in message and len(message) < 300, message  # one short line, however long the path
    assert list(tmp_path.iterdir()) == []


def test_check_path_takes_the_longest_legal_names(tmp_path):
    name = "a" * NAME_MAX
    assert check_path(tmp_path / name, "--out") == tmp_path / name
    depth = (PATH_MAX - 1 - len(os.fsencode(str(tmp_path))) - 1) // (NAME_MAX + 1)
    assert check_path(tmp_path.joinpath(*[name] * depth), "--out")


@pytest.mark.parametrize("where", ["loop", "loop/s", "loop/a/b.npz", "a/loop/s", "cycle1/x"])
def test_symlink_loops_are_one_line_not_a_runtime_error(where, tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "loop").symlink_to("loop")
    (tmp_path / "cycle1").symlink_to(tmp_path / "cycle2")
    (tmp_path / "cycle2").symlink_to(tmp_path / "cycle1")
    with pytest.raises(OutputError, match="runs through a symlink loop"):
        resolved(tmp_path / where, "--npz")
    with pytest.raises(OutputError, match="runs through a symlink loop; remove the loop or choose another --out"):
        check_writable(tmp_path / where, "--out")


def test_resolved_follows_ordinary_links_and_missing_paths(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert resolved(tmp_path / "link" / "new" / "x.npz") == (tmp_path / "real" / "new" / "x.npz").resolve()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert resolved(tmp_path / "dangling") == (tmp_path / "nowhere").resolve()


@pytest.mark.parametrize("value", ["", " ", "x" * 300, "/".join(["p" * 250] * 20)])
def test_checked_path_is_a_click_usage_error_naming_the_option(value):
    @click.command()
    @click.option("--out", type=CheckedPath(file_okay=False))
    def cmd(out):
        raise AssertionError("ran with a bad path")

    result = CliRunner().invoke(cmd, ["--out", value])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Invalid value for '--out': --out " in result.output


def test_checked_path_of_the_wrong_kind_says_what_the_option_names(tmp_path):
    (tmp_path / "f").write_text("mine")
    (tmp_path / "d").mkdir()

    @click.command()
    @click.option("--out", type=CheckedPath(file_okay=False))
    @click.option("--json", type=CheckedPath(dir_okay=False))
    def cmd(out, json):
        pass

    result = CliRunner().invoke(cmd, ["--out", str(tmp_path / "f")])
    assert result.exit_code == 2 and "is a file, --out names a directory: choose another" in result.output
    result = CliRunner().invoke(cmd, ["--json", str(tmp_path / "d")])
    assert result.exit_code == 2 and "is a directory, --json names a file: choose another" in result.output
    assert (tmp_path / "f").read_text() == "mine"


# ------------------------------------------------------------------ class 7: whole files, or none


def test_atomic_path_renames_a_complete_file_with_the_usual_mode(tmp_path):
    old = os.umask(0o002)
    try:
        path = write_atomic(tmp_path / "run.json", "{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}" and path.stat().st_mode & 0o777 == 0o664  # not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


@pytest.mark.parametrize("name", ["000001.png", "grid.png", "latents.npz", "run.json", "model.state.safetensors"])
def test_atomic_path_keeps_the_suffix_and_its_temporary_is_recognised(name, tmp_path):
    with atomic_path(tmp_path / name) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == Path(name).suffix
        assert temporary_of(tmp.name) == name
        tmp.write_bytes(b"x")
    assert (tmp_path / name).read_bytes() == b"x"


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        KeyboardInterrupt(),
    ],
)
def test_a_failed_write_leaves_the_old_file_and_no_temporary(failure, tmp_path):
    path = tmp_path / "000003.png"
    path.write_bytes(b"the old image")
    with pytest.raises(OutputError if isinstance(failure, OSError) else KeyboardInterrupt) as info:
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half of the new ")
            raise failure
    if isinstance(failure, OSError):
        assert str(info.value).startswith(f"writing {path} failed: {failure.strerror}")
    assert path.read_bytes() == b"the old image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000003.png"]


@pytest.mark.parametrize(
    ("name", "final"),
    [
        (".000003.tmp.png", "000003.png"),  # the names of earlier versions
        (".grid.tmp.png", "grid.png"),
        (".latents.npz.tmp", "latents.npz"),
        (".x.npz.tmp", "x.npz"),
        (".000003.tmp-0123abcd.png", "000003.png"),  # atomic_path's
        (".run.tmp-89abcdef.json", "run.json"),
        ("000003.png", None),
        (".000003.png", None),
        (".notes", None),
        (".000003.png.bak", None),
        (".lock", None),
        (".x.npz.lock", None),
    ],
)
def test_temporary_of(name, final):
    assert temporary_of(name) == final


# ------------------------------------------------------------------ class 8: one holder at a time


def test_a_second_hold_is_refused_naming_the_first(tmp_path):
    lock = tmp_path / "out" / ".lock"
    with hold(lock, "--out out/", "--out"):
        assert lock.read_text().startswith(f"pid {os.getpid()}: ")
        with pytest.raises(OutputError, match=rf"--out out/ is being written by another run \(pid {os.getpid()}: "):
            with hold(lock, "--out out/", "--out"):
                raise AssertionError("held twice")
        assert lock.exists()  # the refused attempt leaves the holder's lock alone
    assert not (tmp_path / "out").exists()  # the folder made for the lock goes with it
    with hold(lock, "--out out/", "--out"):  # free again
        pass


def test_holder_of_probes_without_holding(tmp_path):
    lock = tmp_path / ".lock"
    assert holder_of(lock) is None and not lock.exists()
    with hold(lock, "x", "--out"):
        assert holder_of(lock) == lock.read_text().strip()
        assert holder_of(lock) is not None  # the probe took nothing away
    assert holder_of(lock) is None


def test_a_hold_keeps_folders_that_were_written_into(tmp_path):
    lock = tmp_path / "a" / "b" / ".lock"
    with hold(lock, "--out a/b", "--out"):
        (tmp_path / "a" / "b" / "000000.png").write_bytes(b"x")
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["000000.png"]


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    lock = tmp_path / ".lock"
    script = (
        "import sys, time; from pathlib import Path; from lego_model.files import hold\n"
        f"with hold(Path({str(lock)!r}), 'x', '--out'):\n    print('held', flush=True); time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline() == "held\n"
        with pytest.raises(OutputError, match=f"pid {proc.pid}: "):
            with hold(lock, "x", "--out"):
                pass
    finally:
        proc.kill()
        proc.wait()
    assert lock.exists()  # SIGKILL: the file stays, its lock does not
    with hold(lock, "x", "--out"):
        assert lock.read_text().startswith(f"pid {os.getpid()}: ")
