"""Where the commands write, and how: the one check of a path a user gives, whole files, locks, the cache directory.

* :func:`check_path` (and :class:`CheckedPath`, the same rule as a click type
  for every path option of every command): a path that is empty or blank,
  has a component over :data:`NAME_MAX` bytes or is over :data:`PATH_MAX`
  bytes in all, or runs through a symlink loop, is refused in one line before
  anything is loaded (the system would fail it later, in a traceback or a
  line thousands of characters long).
* :func:`check_writable`: the writability probe of an output directory.
* :func:`atomic_path` / :func:`write_atomic`: every file the commands write
  appears under its final name complete or not at all; a failed write (a full
  disk, Ctrl-C) removes its temporary.  Temporaries are hidden names beside
  the file, ``.STEM.tmp-XXXXXXXX.SUFFIX``, recognised by
  :func:`temporary_of` so that a later run can remove those a killed run left.
* :func:`hold`: an exclusive advisory lock (flock) that a run holds on what it
  writes for its lifetime; a second run is refused naming the first.  The
  kernel drops it with the process, so a killed run leaves no stale lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shlex
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from lego_model.errors import LegoError, OutputError

__all__ = [
    "NAME_MAX",
    "PATH_MAX",
    "CheckedPath",
    "atomic_path",
    "check_path",
    "check_writable",
    "default_cache_dir",
    "hold",
    "holder_of",
    "make_parents",
    "remove_if_empty",
    "resolved",
    "shown_path",
    "temporary_of",
    "write_atomic",
]

NAME_MAX = 255  # bytes in one path component: the limit of every Linux file system (ext4, xfs, btrfs, tmpfs)
PATH_MAX = 4096  # bytes in a whole path, its terminating NUL included: what the kernel takes in one system call
_SHOWN = 100  # characters of a path shown in full in a message; longer ones are cut in the middle


def shown_path(path: str | os.PathLike[str]) -> str:
    """A path for a one-line message: as is, or its start and end with its length when it is long."""
    text = os.fspath(path)
    if len(text) <= _SHOWN:
        return text
    return f"{text[:60]}...{text[-30:]} ({len(os.fsencode(text))} bytes)"


def check_path(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """``path`` as a Path, when it can name a file at all; an :class:`OutputError` line naming ``option`` if not.

    Refused: an empty or blank path (``--out ''`` would mean the current
    directory), a component over :data:`NAME_MAX` bytes, a path over
    :data:`PATH_MAX` bytes once made absolute, and a symlink loop on the way
    (:func:`resolved`).  Nothing is created.
    """
    text = os.fspath(path)
    if not text.strip():
        raise OutputError(f"{option} is {'empty' if not text else 'blank'}; give a path")
    for part in Path(text).parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise OutputError(
                f"{option} has a name of {size} bytes ({part[:20]}...{part[-10:]}); file systems take at most "
                f"{NAME_MAX}: choose a shorter {option}"
            )
    size = len(os.fsencode(os.path.abspath(text)))
    if size >= PATH_MAX:
        raise OutputError(
            f"{option} {shown_path(text)} is {size} bytes long as an absolute path; the system takes at most "
            f"{PATH_MAX - 1}: choose a shorter {option}"
        )
    resolved(text, option)
    return Path(text)


def resolved(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """``Path(path).resolve()``; a symlink loop on the way is an :class:`OutputError` line naming ``option``.

    Python before 3.13 raises RuntimeError for a loop, later ones return the
    path with the loop unresolved (which the system then refuses with ELOOP);
    both are the one line here.
    """
    try:
        real = Path(path).resolve()
        os.stat(real)
    except RuntimeError:  # "Symlink loop from ..."
        pass
    except OSError as err:
        if err.errno != errno.ELOOP:
            return Path(path).resolve()  # missing, or no permission: the caller's own checks say what
    else:
        return real
    raise OutputError(
        f"{option} {shown_path(path)} runs through a symlink loop; remove the loop or choose another {option}"
    )


class CheckedPath(click.Path):
    """``click.Path`` that applies :func:`check_path` first: one rule for the path options of every command."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (str, os.PathLike)):
            option = param.opts[0] if param is not None and param.opts else "the path"
            try:
                check_path(value, option)
            except LegoError as err:
                self.fail(str(err), param, ctx)
            # click's own words ("Directory '...' is a file.") say no more than what is wrong: add the fix
            path = Path(value)
            if not self.file_okay and path.is_file():
                self.fail(f"{shown_path(path)} is a file, {option} names a directory: choose another", param, ctx)
            if not self.dir_okay and path.is_dir():
                self.fail(f"{shown_path(path)} is a directory, {option} names a file: choose another", param, ctx)
        return super().convert(value, param, ctx)


def check_writable(directory: str | Path, option: str = "--out") -> None:
    """Prove that entries can be made in ``directory`` without creating it (OutputError otherwise).

    The probe is a folder made and removed again in the directory, or in its
    nearest existing ancestor when it does not exist yet: the truest test
    (root ignores file modes; /proc, /sys and read-only mounts have rules of
    their own), and a refused or failed run leaves no empty directory behind,
    since the commands create ``directory`` when they write into it.
    ``option`` names the command-line option the path came from; the path
    passes :func:`check_path` first.
    """
    directory = check_path(directory, option)
    probe = directory
    try:
        while not probe.exists() and not probe.is_symlink() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():  # a file, or a dangling symlink, on the way
            raise OutputError(
                f"cannot write to {shown_path(directory)}: {shown_path(probe)} is not a directory; "
                f"choose another {option}"
            )
        os.rmdir(tempfile.mkdtemp(prefix=".lego-write-test-", dir=probe))
    except OSError as err:
        where = f"cannot write to {shown_path(directory)}: " if probe != directory else ""
        raise OutputError(
            f"{where}cannot write in {shown_path(probe)} ({err.strerror or err}); choose another {option}"
        ) from None


# ------------------------------------------------------------------------------------------------ whole files

# ".STEM.tmp-XXXXXXXX.SUFFIX" (atomic_path), and the names earlier versions used: ".STEM.tmp.SUFFIX" and ".NAME.tmp".
_TEMPORARY = re.compile(r"\.(?P<stem>.+?)\.tmp(?:-[0-9a-f]+)?(?P<suffix>\.[A-Za-z0-9]+)?")


def temporary_of(name: str) -> str | None:
    """The final name whose temporary ``name`` is (see :func:`atomic_path`), or None when it is no temporary."""
    m = _TEMPORARY.fullmatch(name)
    return None if m is None else m["stem"] + (m["suffix"] or "")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the file at; it becomes ``path`` when the block ends.

    The temporary keeps the suffix (PIL and numpy choose the format by it) and
    is hidden: ``.STEM.tmp-XXXXXXXX.SUFFIX``.  On normal exit it is renamed
    onto ``path`` in one step, so a reader (or ``--resume``) sees the old file
    or the complete new one, never half of it; on any exception (a full disk,
    Ctrl-C) it is removed and ``path`` is as it was.  An OSError on the way
    becomes an :class:`OutputError` line naming ``path``.  The file gets the
    mode the writer's ``open`` gives (0666 less the umask), as any other.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError):
            raise OutputError(f"writing {shown_path(path)} failed: {err.strerror or err}; nothing was written under "
                              "that name") from None  # fmt: skip
        raise


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through :func:`atomic_path`; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


# ------------------------------------------------------------------------------------------------ locks


def make_parents(folder: Path) -> list[Path]:
    """mkdir -p ``folder``; the folders it created, innermost first (for :func:`remove_if_empty` to remove again)."""
    missing = []
    while not folder.exists() and not folder.is_symlink():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
    return missing


def remove_if_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (innermost first) that is empty; the others stay."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _holder(lock: Path) -> str:
    try:
        with open(lock, encoding="utf-8", errors="replace") as f:
            text = f.read(400).strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "pid unknown"


def _this_run() -> str:
    argv = list(getattr(sys, "orig_argv", sys.argv))
    argv[0] = Path(argv[0]).name
    command = shlex.join(argv)
    return f"pid {os.getpid()}: {command if len(command) <= 160 else command[:157] + '...'}"


def _acquire(lock: Path) -> int | None:
    """An fd holding an exclusive flock on ``lock`` (created), None when it is held; its holder is written in it."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except PermissionError:  # another user's lock file: a read-only fd takes a flock too
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:  # a file system without flock: nothing to hold, nothing to refuse
            return fd
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and flock: lock the new one
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.write(fd, (_this_run() + "\n").encode())
    return fd


def holder_of(lock: Path) -> str | None:
    """Who holds ``lock`` (as :func:`hold` wrote it) while another process holds it, else None; holds nothing."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(lock)
    except OSError:
        return None
    finally:
        os.close(fd)  # releases the probe's own lock
    return None


@contextlib.contextmanager
def hold(lock: Path, what: str, option: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``lock`` for the block: ``what`` (e.g. "--out samples/") is ours.

    Refused with an :class:`OutputError` line naming the holder (its pid and
    command line) and ``option`` while another process holds it.  The lock
    file and the folders made for it go again at the end (the file first,
    while still locked: a run that opened it meanwhile sees a removed file and
    locks a fresh one).  A killed holder's lock is free again at once (the
    kernel drops it with the process); its file is reused.
    """
    created: list[Path] = []
    try:
        created = make_parents(lock.parent)
        fd = _acquire(lock)
    except OSError as err:
        remove_if_empty(created)
        raise OutputError(f"cannot lock {what} ({err.strerror or err}); choose another {option}") from None
    if fd is None:
        remove_if_empty(created)
        raise OutputError(
            f"{what} is being written by another run ({_holder(lock)}); wait for it to end, or choose another {option}"
        )
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        remove_if_empty(created)


def default_cache_dir() -> Path:
    """``$LEGO_CACHE_DIR``, else ``$XDG_CACHE_HOME/lego-deploy``, else ``~/.cache/lego-deploy``.

    The TensorRT timing and engine caches and OpenVINO's compiled models live under it.
    """
    if os.environ.get("LEGO_CACHE_DIR"):
        return Path(os.environ["LEGO_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lego-deploy"
