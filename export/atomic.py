"""A directory replaced as a whole: built beside its target, then swapped into place in one atomic exchange.

:func:`staged_replacement` is the transaction: it yields a temporary
directory beside the target (same file system; ``.NAME.partial-PID-XXXXXXXX``,
flock-ed while it is written); normal exit swaps it with the target (Linux
renameat2 RENAME_EXCHANGE where the file system has it, else two renames with
the old directory set aside for a moment), and the old content is deleted;
any exception, interrupts included, removes it and leaves the target as it
was.  Temporaries of killed transactions are recognised by their name, a dead
PID and a free lock, and removed (or, for a set-aside old directory whose
target vanished, moved back) by the next transaction into the same target
(:func:`remove_stale_temporaries`).  Nothing here knows what the directory
holds: :mod:`export.pipeline` decides what may be replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from export.errors import ExportError
from lego_model.files import make_parents, remove_if_empty

__all__ = ["exchange", "remove_stale_temporaries", "replace_directory", "staged_replacement"]

log = logging.getLogger(__name__)

# Temporary directories beside the target: ".NAME.partial-PID-XXXXXXXX" while an export builds (and, after the
# swap, holding the replaced directory until it is deleted); ".NAME.old-PID-XXXXXXXX" only where the file system
# cannot exchange two directories and the old one is set aside for a moment.
_TEMP_DIR = re.compile(r"\.(?P<name>.+)\.(?P<what>partial|old)-(?P<pid>[0-9]+)-[a-z0-9_]+")


def remove_stale_temporaries(target: Path) -> None:
    """Delete the temporary directories that killed exports into ``target`` left beside it.

    Only ours (``.NAME.partial-PID-*`` and ``.NAME.old-PID-*`` of this NAME) and
    only where no live export holds them (:func:`_in_use`).  A set-aside old
    directory whose target is missing (killed between the two renames of the
    fallback swap) is moved back instead.
    """
    try:
        candidates = sorted(target.parent.iterdir())
    except OSError:
        return  # an unreadable parent: check_writable says so
    for path in candidates:
        m = _TEMP_DIR.fullmatch(path.name)
        if not m or m["name"] != target.name or path.is_symlink() or not path.is_dir() or _in_use(path, int(m["pid"])):
            continue
        try:
            if m["what"] == "old" and not target.exists() and not target.is_symlink():
                log.warning("restoring %s from %s (an export was killed while replacing it)", target, path.name)
                path.rename(target)
            else:
                log.info("removing %s, left by a killed export", path)
                shutil.rmtree(path)
        except OSError as err:  # not ours to fix (permissions): the export itself may still succeed
            log.warning("could not clean up %s: %s", path, err)


def _in_use(path: Path, pid: int) -> bool:
    """Whether an export may still be writing ``path``: its lock is held, or the PID in its name runs.

    Both, because an export creates its directory a moment before it locks it;
    a PID reused by another process only delays the cleanup.
    """
    if _pid_alive(pid):
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return True  # cannot look: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True  # an export on another host or PID namespace holds it
    except OSError:
        return False  # no flock on this file system: the dead PID decides
    finally:
        os.close(fd)  # releases the probe's lock too
    return False


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on directory ``path`` (None where the file system has no locks)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def staged_replacement(target: Path, shown: str | Path | None = None) -> Iterator[Path]:
    """Yield a fresh directory beside ``target``; on normal exit it replaces ``target``, on any exception it vanishes.

    The replacement is one atomic exchange where the file system has one
    (Linux renameat2 RENAME_EXCHANGE): at every instant ``target`` is the old
    or the new directory.  Temporaries of killed earlier transactions are
    removed first, and folders created for ``target``'s parent are removed
    again on failure.  An OSError on the way (a full disk, a permission) is one
    :class:`ExportError` line naming ``shown`` (default: ``target``).
    """
    created: list[Path] = []
    staging: Path | None = None
    lock = None
    try:
        created = make_parents(target.parent)
        remove_stale_temporaries(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
        lock = _lock(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary output directory
        yield staging
        replace_directory(staging, target)
        staging = None
    except BaseException as err:  # KeyboardInterrupt included: nothing half-written stays behind
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        remove_if_empty(created)
        if isinstance(err, OSError):
            where = f" ({err.filename})" if err.filename else ""
            what = target if shown is None else shown
            raise ExportError(f"writing {what} failed: {err.strerror or err}{where}; nothing was replaced") from None
        raise
    finally:
        if lock is not None:
            os.close(lock)


def replace_directory(new: Path, out: Path) -> None:
    """Move directory ``new`` to ``out``, atomically replacing an existing ``out``; the old content is deleted."""
    if not out.exists():
        new.rename(out)
        return
    if exchange(new, out):  # ``new`` now holds the old directory, under a name remove_stale_temporaries knows
        shutil.rmtree(new, ignore_errors=True)
        return
    # No atomic exchange here: set the old one aside for a moment (remove_stale_temporaries moves it back
    # if a kill lands between the two renames).
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        new.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 with RENAME_EXCHANGE); False where the system or file system cannot."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
