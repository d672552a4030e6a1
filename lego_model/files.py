"""Where the commands write: the writability probe of an output path, and the project's cache directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lego_model.errors import OutputError

__all__ = ["check_writable", "default_cache_dir"]


def check_writable(directory: str | Path, option: str = "--out") -> None:
    """Prove that entries can be made in ``directory`` without creating it (OutputError otherwise).

    The probe is a folder made and removed again in the directory, or in its
    nearest existing ancestor when it does not exist yet: the truest test
    (root ignores file modes; /proc, /sys and read-only mounts have rules of
    their own), and a refused or failed run leaves no empty directory behind,
    since the commands create ``directory`` when they write into it.
    ``option`` names the command-line option the path came from.
    """
    directory = Path(directory)
    probe = directory
    try:
        while not probe.exists() and not probe.is_symlink() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():  # a file, or a dangling symlink, on the way
            raise OutputError(f"cannot write to {directory}: {probe} is not a directory; choose another {option}")
        os.rmdir(tempfile.mkdtemp(prefix=".lego-write-test-", dir=probe))
    except OSError as err:
        where = f"cannot write to {directory}: " if probe != directory else ""
        raise OutputError(f"{where}cannot write in {probe} ({err.strerror or err}); choose another {option}") from None


def default_cache_dir() -> Path:
    """``$LEGO_CACHE_DIR``, else ``$XDG_CACHE_HOME/lego-deploy``, else ``~/.cache/lego-deploy``.

    The TensorRT timing and engine caches and OpenVINO's compiled models live under it.
    """
    if os.environ.get("LEGO_CACHE_DIR"):
        return Path(os.environ["LEGO_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lego-deploy"
