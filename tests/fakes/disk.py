"""A full disk for tests: writes under one folder take a given number of bytes, then fail with ENOSPC mid-file."""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path


class _Filling:
    """A file that takes ``room`` more bytes (shared by every file of the disk), then fails as a full disk."""

    def __init__(self, f, disk: dict[str, int]):
        self._f, self._disk = f, disk

    def write(self, data) -> int:
        data = bytes(data)
        n = min(len(data), self._disk["room"])
        self._f.write(data[:n])
        self._disk["room"] -= n
        if n < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        return n

    def fileno(self) -> int:  # writers that would bypass write() (PIL's encoder) fall back to it
        raise io.UnsupportedOperation("fileno")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def full_disk(monkeypatch, root: Path, room: int) -> None:
    """Files opened for writing under ``root`` share ``room`` bytes; the write that crosses it raises ENOSPC.

    safetensors writes from Rust, past ``open``: its ``save_file`` (as lego_model.checkpoints calls it) gets
    the same disk, and fails as the real one does on a full disk (a SafetensorError naming os error 28).
    """
    import safetensors.torch
    from safetensors import SafetensorError

    import lego_model.checkpoints

    real_open, disk = builtins.open, {"room": room}

    def save_file(tensors, filename, metadata=None) -> None:
        if not Path(os.path.abspath(filename)).is_relative_to(root):
            return real_save_file(tensors, filename, metadata=metadata)
        data = safetensors.torch.save(tensors, metadata=metadata)
        n = min(len(data), disk["room"])
        with real_open(filename, "wb") as f:
            f.write(data[:n])
        disk["room"] -= n
        if n < len(data):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    real_save_file = lego_model.checkpoints.save_file
    monkeypatch.setattr(lego_model.checkpoints, "save_file", save_file)

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        writing = isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
        if writing and Path(os.path.abspath(file)).is_relative_to(root):
            return _Filling(f, disk)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
