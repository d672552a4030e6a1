"""The output side of a sampling run: per-seed PNGs, grid.png, the npz, run.json, and what ``--resume`` may reuse.

Every file is written under a temporary name and renamed into place
(:func:`lego_model.files.atomic_path`), so that a file that exists is always
complete and a failed write (a full disk) leaves nothing behind.  A run holds
its ``--out`` and its ``--npz`` for its lifetime (:func:`hold_outputs`, an
flock on ``--out/.lock`` and on ``.NPZ.lock`` beside the npz): a second run
into either is refused naming the first, and a run that holds them removes
the temporaries killed runs left there.  ``run.json`` beside the PNGs records
the settings that decide their pixels (:func:`run_settings`); a later run into
the same ``--out``, resumed or not, must have the same settings, so one
directory (and its npz) never mixes two runs; it is read with bounds
(:data:`MAX_RECORD_BYTES`, :func:`lego_model.parsing.parse_json`).  Which seeds
a run samples and the batch size do not change a seed's image beyond rounding,
nor does the backend at fp32 (fp32 backends agree to one uint8 level): a
resume may add seeds, and at fp32 continue on another backend.  bf16 and int8
results are each backend's own (OpenVINO and torch bf16 differ by up to
29/255), so there run.json records the backend and a resume must keep it.  A
refused or failed run leaves no empty directory behind: what the lock created
goes with it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lego_model.checkpoints import file_sha256
from lego_model.errors import TextError
from lego_model.files import (
    atomic_path,
    check_writable,
    hold,
    holder_of,
    resolved,
    shown_path,
    temporary_of,
    write_atomic,
)
from lego_model.images import make_grid, save_image
from lego_model.parsing import parse_json
from lego_model.request import Request
from runtimes.errors import OutputError

log = logging.getLogger(__name__)

__all__ = [
    "GRID_MAX",
    "LATENTS_NPZ",
    "RUN_FILE",
    "RunOutputs",
    "check_targets",
    "check_writable",
    "hold_outputs",
    "read_png",
    "run_settings",
    "seed_latent",
    "seed_png",
]

GRID_MAX = 64  # images in grid.png
RUN_FILE = "run.json"
RUN_FORMAT = "lego-sample-run/1"
LATENTS_NPZ = "latents.npz"  # a latent model's output without a decoder
LOCK_FILE = ".lock"  # in --out, while a run holds it (hold_outputs)
MAX_RECORD_BYTES = 1 << 24  # run.json: settings of up to MAX_STEPS steps are a few kB
_OUR_FILE = re.compile(
    r"^(\d{6,}\.(png|npy)|grid\.png|latents\.npz)$"
)  # the names a run writes into --out (besides run.json)
_OLD_RECORD_TEMPORARY = re.compile(r"\.run-[A-Za-z0-9_]+\.json")  # run.json's temporaries before atomic_path
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # PNG mode of an image with that many channels


def seed_png(out: Path, seed: int) -> Path:
    """The PNG of ``seed`` in the output directory ``out``."""
    return out / f"{seed:06d}.png"


def seed_latent(out: Path, seed: int) -> Path:
    """The latent (.npy, float32 CHW) of ``seed`` in ``out``: a latent model's output without a decoder."""
    return out / f"{seed:06d}.npy"


def write_latent(latent: np.ndarray, path: Path) -> None:
    """One seed's float32 CHW latent, written whole (:func:`~lego_model.files.atomic_path`) as the PNGs are."""
    with atomic_path(path) as tmp:
        np.save(tmp, latent.astype(np.float32))


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """An uncompressed npz of ``arrays``, written whole (:func:`~lego_model.files.atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def assemble_latents(out: Path, seeds: list[int]) -> Path:
    """``latents.npz`` of all seeds (arr_0: float32 [N, C, h, w], seeds: int64), read back from the .npy files."""
    arr = np.stack([np.load(seed_latent(out, s)) for s in seeds])
    path = out / LATENTS_NPZ
    write_npz(path, arr_0=arr, seeds=np.asarray(seeds, dtype=np.int64))
    return path


def write_png(image: np.ndarray, path: Path) -> None:
    """Write whole (:func:`~lego_model.files.atomic_path`), so that an existing PNG always is a complete image."""
    with atomic_path(path) as tmp:
        save_image(image, tmp)


def read_png(path: Path) -> np.ndarray:
    """uint8 HWC (grayscale files come back with one channel)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    return arr[:, :, None] if arr.ndim == 2 else arr


def grid_seeds(seeds: list[int], rows: int | None) -> list[int]:
    """The seeds grid.png shows: the first :data:`GRID_MAX`, or with ``rows`` (one per class) the first of each row."""
    if rows is None:
        return seeds[:GRID_MAX]
    per_row = len(seeds) // rows
    shown = min(per_row, max(1, 4 * GRID_MAX // rows))
    return [s for r in range(rows) for s in seeds[r * per_row : r * per_row + shown]]


def assemble(out: Path, seeds: list[int], npz: Path | None, grid_rows: int | None = None) -> list[Path]:
    """grid.png (see :func:`grid_seeds`) and the npz of all seeds, read back from the per-seed PNGs."""
    written = []
    grid_imgs = np.stack([read_png(seed_png(out, s)) for s in grid_seeds(seeds, grid_rows)])
    write_png(make_grid(grid_imgs, rows=grid_rows), out / "grid.png")
    written.append(out / "grid.png")
    if npz is not None:
        arr = np.stack([read_png(seed_png(out, s)) for s in seeds])  # (N, H, W, C) uint8
        write_npz(npz, arr_0=arr)
        written.append(npz)
    return written


def run_settings(
    request: Request, *, weights: str, precision: str, output: str = "images", backend: str | None = None
) -> dict[str, Any]:
    """What decides a seed's pixels, in the order a difference is reported (JSON values, as read back).

    The request's settings (model, size, steps, solver, class, guidance, churn,
    bricks per step) with what the run adds: the weights' identity and the
    precision that computed, ``output`` ("images", or "latents" for a
    latent model without a decoder), and ``backend`` where its results are its
    own (``Backend.shares_results`` False: bf16, fp16, int8), so that a resume
    on another backend is refused there and allowed where results agree to fp32 rounding.
    """
    own = request.settings()
    settings = {"model": own.pop("model"), "config": own.pop("config"), "weights": weights, "precision": precision}
    if backend is not None:
        settings["backend"] = backend
    settings.update(own)
    settings["output"] = output
    return json.loads(json.dumps(settings))  # tuples become lists, as when read back


_JSON_TYPES = {str: "text", bool: "true/false", int: "a whole number", float: "a number", list: "a list",
               dict: "an object", type(None): "null"}  # fmt: skip


def _as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def first_difference(recorded: dict[str, Any], settings: dict[str, Any]) -> str | None:
    """'steps 18 (this run: 4)' for the first setting that differs, or None.

    Values are compared and shown as JSON (text unquoted), so ``"3"``,
    ``3.0``, ``true`` and ``3`` all differ; where two differing values print
    alike the types are shown: 'steps "3", text (this run: 3, a whole number)'.
    """
    for key, value in settings.items():
        old = recorded.get(key)
        if key not in recorded or _as_json(old) != _as_json(value):
            show = lambda v: v if isinstance(v, str) else _as_json(v)  # noqa: E731  (true, null: as in run.json)
            old_s, new_s = show(old), show(value)
            if key not in recorded:
                old_s = "missing"
            elif old_s == new_s:  # "3" and 3, "None" and null
                old_s = f"{_as_json(old)}, {_JSON_TYPES.get(type(old), type(old).__name__)}"
                new_s = f"{_as_json(value)}, {_JSON_TYPES.get(type(value), type(value).__name__)}"
            if max(len(old_s), len(new_s)) > 60 and isinstance(old, list) and isinstance(value, list):
                # Shortened, two long lists (bricks per step) would read alike: name the first entry that differs
                return _first_entry_difference(key, old, value)
            old_s, new_s = (_shorten(t) for t in (old_s, new_s))
            return f"{key} {old_s} (this run: {new_s})"
    return None


def _shorten(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


def _first_entry_difference(key: str, old: list, new: list) -> str:
    """'bricks per step, entry 9 of 18 (from 0): [0, 1, 2] (this run: [0, 1])' for two lists that differ."""
    for i, (a, b) in enumerate(zip(old, new)):
        if _as_json(a) != _as_json(b):
            where = f"entry {i} of {len(old)}" if len(old) == len(new) else f"entry {i}"
            return f"{key}, {where} (from 0): {_shorten(_as_json(a))} (this run: {_shorten(_as_json(b))})"
    return f"{key}: {len(old)} entries (this run: {len(new)})"


def check_png(path: Path, height: int, width: int, channels: int) -> str | None:
    """Why ``path`` is not a complete height x width image of ``channels`` channels, or None when it is."""
    from PIL import Image

    want = _MODES.get(channels, "?")
    try:
        with Image.open(path) as im:
            im.load()  # decodes every row: a truncated file fails here
            mode, size = im.mode, im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"cannot be decoded ({err})"
    if size != (width, height) or mode != want:
        return f"is a {size[1]}x{size[0]} {mode} image, this run writes {height}x{width} {want}"
    return None


def check_latent(path: Path, height: int, width: int, channels: int) -> str | None:
    """Why ``path`` is not a complete float32 latent of shape (channels, height, width), or None when it is."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        return f"cannot be read ({err})"
    if arr.shape != (channels, height, width) or arr.dtype != np.float32:
        return (
            f"holds a {arr.dtype} array of shape {list(arr.shape)}, this run writes float32 {[channels, height, width]}"
        )
    return None


def _inside(path: Path, directory: Path, option: str) -> bool:
    return resolved(path, option).is_relative_to(resolved(directory, "--engine-dir"))


def check_targets(out: Path, npz: Path | None, engine_dir: str | Path | None) -> None:
    """What can be refused about --out and --npz before anything is loaded, locked or created.

    Refused: either one inside the engine directory (lego-export owns it;
    through symlinks too), a symlink loop on the way, and one that cannot be
    written (:func:`~lego_model.files.check_writable`).
    """
    if engine_dir is not None:
        for path, option in ((out, "--out"), (npz, "--npz")):
            if path is not None and _inside(path, Path(engine_dir), option):
                raise OutputError(
                    f"{option} {shown_path(path)} lies inside the engine directory {shown_path(engine_dir)}; "
                    "write samples elsewhere (lego-export owns that directory)"
                )
    check_writable(out, "--out")
    if npz is not None:
        check_writable(resolved(npz, "--npz").parent, "--npz")


def _npz_lock(npz: Path) -> Path:
    real = resolved(npz, "--npz")  # one lock however the path is spelt
    return real.with_name(f".{real.name}.lock")


def _remove_stale(directory: Path, ours: Any) -> None:
    """Delete the temporaries in ``directory`` whose final name ``ours(name)`` accepts (their run is dead: the
    caller holds the lock a live run would hold)."""
    try:
        names = [p.name for p in directory.iterdir()]
    except OSError:
        return
    for name in names:
        final = temporary_of(name)
        if (final is not None and ours(final)) or (ours(RUN_FILE) and _OLD_RECORD_TEMPORARY.fullmatch(name)):
            path = directory / name
            if path.is_file() and not path.is_symlink():
                log.info("removing %s, left by a killed run", path)
                with contextlib.suppress(OSError):
                    path.unlink()


@contextlib.contextmanager
def hold_outputs(out: Path, npz: Path | None) -> Iterator[None]:
    """Hold ``out`` and ``npz`` for a run's lifetime (:func:`lego_model.files.hold`); a second run is refused.

    The lock of --out is ``out/.lock`` (--out is the run's own), that of
    --npz ``.NAME.lock`` beside the npz's resolved path; both go when the run
    ends, with the folders made for them where they are still empty.  Once
    held, the temporaries a killed run left in --out (and of this npz) are
    removed: no live run owns them.  An npz in the --out of another live run
    is refused.  Call it on one process of a torchrun
    launch (rank 0), before the others write.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(hold(out / LOCK_FILE, f"--out {shown_path(out)}", "--out"))
        _remove_stale(out, lambda name: name == RUN_FILE or _OUR_FILE.fullmatch(name) is not None)
        if npz is not None:
            stack.enter_context(hold(_npz_lock(npz), f"--npz {shown_path(npz)}", "--npz"))
            real = resolved(npz, "--npz")
            other = real.parent != resolved(out) and holder_of(real.parent / LOCK_FILE)
            if other:  # another live run's --out is that run's alone
                raise OutputError(
                    f"--npz {shown_path(npz)} lies in the --out of another run ({other}); choose another --npz"
                )
            _remove_stale(real.parent, lambda name: name == real.name)
        yield


@dataclass
class RunOutputs:
    """Where one sampling run writes (``out``, ``npz``), the settings it records, and the checks before compute."""

    out: Path
    npz: Path | None
    settings: dict[str, Any]
    backend: str  # recorded for the reader, not compared
    latents: bool = False  # a latent model without a decoder writes .npy latents and latents.npz, not PNGs

    def seed_file(self, seed: int) -> Path:
        """The file ``seed`` is written to: its PNG, or its latent .npy."""
        return (seed_latent if self.latents else seed_png)(self.out, seed)

    # ---------------------------------------------------------------- before any compute
    def check(
        self, seeds: list[int], *, resume: bool, height: int, width: int, channels: int, engine_dir: str | Path | None
    ) -> list[int]:
        """Refuse outputs that would destroy or mix anything; returns the seeds still to sample.

        Refused: what :func:`check_targets` refuses; an --out that holds PNGs
        without run.json, or a run.json of other settings (the first
        difference is named); an existing --npz that is not this run's own; on
        --resume, an existing PNG of these seeds that does not decode to this
        run's size and mode (named; delete it and resume again to re-sample it).
        """
        check_targets(self.out, self.npz, engine_dir)
        recorded = self._recorded()
        if recorded is None:
            ours = sorted(p.name for p in self._listing() if _OUR_FILE.match(p.name))
            if ours:
                raise OutputError(
                    f"{self.out} holds {ours[0]} (and {len(ours) - 1} more) but no {RUN_FILE}, so their settings "
                    "are unknown; choose another --out, or move them away"
                )
        else:
            diff = first_difference(recorded["settings"], self.settings)
            if diff is not None:
                raise OutputError(
                    f"{self.out} holds a run with {diff}; run with the same settings (--resume continues it) "
                    "or choose another --out"
                )
        if self.npz is not None:
            self._check_npz(recorded)
        if not resume:
            return list(seeds)
        todo, bad = [], []
        check_file = check_latent if self.latents else check_png
        for s in seeds:
            path = self.seed_file(s)
            if not path.is_file():
                todo.append(s)
            elif (why := check_file(path, height, width, channels)) is not None:
                bad.append(f"{path} {why}")
        if bad:
            more = f" ({len(bad) - 1} more bad files)" if len(bad) > 1 else ""
            raise OutputError(f"{bad[0]}{more}; delete it and run --resume again to re-sample it")
        return todo

    def _listing(self) -> list[Path]:
        return list(self.out.iterdir()) if self.out.is_dir() else []

    def _recorded(self) -> dict[str, Any] | None:
        path = self.out / RUN_FILE
        if not path.exists():
            return None
        if not path.is_file():
            raise OutputError(f"{path} is not a file; choose another --out")
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_RECORD_BYTES + 1)
            if len(data) > MAX_RECORD_BYTES:
                raise TextError(f"over {MAX_RECORD_BYTES} bytes, which no run writes")
            recorded = parse_json(data, infinity=True)  # S_max is inf unless bounded
        except OSError as err:
            raise OutputError(f"{path} cannot be read ({err.strerror or err}); choose another --out") from None
        except TextError as err:
            raise OutputError(f"{path} cannot be read ({err}); choose another --out") from None
        if not (isinstance(recorded, dict) and recorded.get("format") == RUN_FORMAT):
            raise OutputError(f"{path} is not a {RUN_FORMAT} record; choose another --out")
        if not isinstance(recorded.get("settings"), dict):
            raise OutputError(f"{path} has no settings; choose another --out")
        return recorded

    def _check_npz(self, recorded: dict[str, Any] | None) -> None:
        npz = self.npz
        assert npz is not None
        real = resolved(npz, "--npz")
        if _OUR_FILE.match(npz.name) or npz.name == RUN_FILE:  # a name a run writes: in this --out or another's
            if real.parent == resolved(self.out):
                raise OutputError(f"--npz {npz} would overwrite this run's own {npz.name}; choose another --npz")
            if (real.parent / RUN_FILE).is_file():
                raise OutputError(
                    f"--npz {npz} would overwrite the {npz.name} of the run in {real.parent}; choose another --npz"
                )
        if not npz.exists():
            return
        mine = (recorded or {}).get("npz") or {}
        if mine.get("path") == str(real) and mine.get("sha256") in (None, file_sha256(npz)):
            return  # this run's own npz (same settings, checked above): replaced when the run ends
        raise OutputError(
            f"--npz {npz} already exists and is not this run's npz; choose another --npz or remove the file"
        )

    # ---------------------------------------------------------------- writing
    def write_record(self, npz_sha256: str | None = None) -> None:
        """Write run.json (before the first PNG of a process, again with the npz's sha256 when it is written).

        Its temporary name is unique (every torchrun rank may write the same record at once), its mode is the
        PNGs' (whoever may read the images may resume the run).
        """
        self.out.mkdir(parents=True, exist_ok=True)
        npz = None if self.npz is None else {"path": str(self.npz.resolve()), "sha256": npz_sha256}
        record = {"format": RUN_FORMAT, "settings": self.settings, "backend": self.backend, "npz": npz}
        write_atomic(self.out / RUN_FILE, json.dumps(record, indent=1))

    def write_batch(self, seeds: Sequence[int], images: np.ndarray, first: bool) -> None:
        """One PNG per seed, each written whole (a rename); the first batch of a process writes run.json first."""
        if first:
            self.write_record()
        write = write_latent if self.latents else write_png
        for seed, img in zip(seeds, images):
            write(img, self.seed_file(seed))

    def assemble(self, seeds: list[int], grid_rows: int | None = None) -> list[Path]:
        """grid.png and the npz from the PNGs of all ``seeds``; run.json then records the npz's sha256."""
        if self.npz is not None:
            self.npz.parent.mkdir(parents=True, exist_ok=True)
        files = (
            [assemble_latents(self.out, seeds)]
            if self.latents
            else assemble(self.out, seeds, self.npz, grid_rows=grid_rows)
        )
        self.write_record(None if self.npz is None else file_sha256(self.npz))
        return files
