"""Loading and saving checkpoints.

Formats, chosen by suffix:

* ``.safetensors``: our own format; the config travels as JSON in the metadata.
* ``.pkl``: the authors' training snapshots (``network-snapshot-*.pkl``), a
  pickled dict whose ``'ema'`` entry is an EDMPrecondLEGO saved with their
  torch_utils.persistence.  Such a file embeds Python source that plain
  unpickling would execute.  :class:`_SnapshotUnpickler` executes nothing: it
  resolves only a short list of tensor-rebuilding functions and turns every
  other class or callable into an inert record of its name and arguments, from
  which we read the constructor kwargs and the tensors.  It also bounds its
  work (``MAX_SNAPSHOT_*``, ``MAX_MODULE_*``): a pickle can ask for endless
  work without naming any code.
* ``.pt`` / ``.pth``: a plain state dict, read with ``torch.load(weights_only=True)``;
  these carry no config, so one must be named.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import reprlib
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lego_model.configs import LegoConfig, get_config
from lego_model.errors import CheckpointError, ConfigError, OutputError
from lego_model.files import atomic_path, shown_path
from lego_model.model import LegoModel

FORMAT_TAG = "lego-diffusion/1"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_safetensors(
    path: str | Path, what: str = "safetensors file"
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; a :class:`CheckpointError` "PATH is not a readable WHAT" if not."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable {what} ({err})") from None


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write tensors and metadata whole (:func:`lego_model.files.atomic_path`): ``path`` is complete or as it was.

    A failed write (a full disk) is an :class:`OutputError` line and leaves no temporary behind.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as err:  # safetensors reports the system's errors (ENOSPC) as its own type
            if "os error" not in str(err):
                raise
            raise OutputError(
                f"writing {shown_path(path)} failed: {err}; nothing was written under that name"
            ) from None
    return path


def save_checkpoint(model: LegoModel, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write weights and config as safetensors (written to a temporary name, then renamed)."""
    meta = {"format": FORMAT_TAG, "lego_config": model.config.to_json(), **(metadata or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return write_safetensors(tensors, path, meta)


def load_checkpoint(path: str | Path, config: str | LegoConfig | None = None) -> LegoModel:
    """Build a :class:`LegoModel` from any supported checkpoint file, in eval mode on the CPU.

    ``config`` (a registry name or a config) is required for plain state dicts
    and overrides nothing for the self-describing formats, where it must agree.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    cfg = get_config(config) if isinstance(config, str) else config
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        found, state = _read_safetensors(path)
    elif suffix == ".pkl":
        found, state = _read_snapshot(path)
    elif suffix in (".pt", ".pth"):
        found, state = None, _read_state_dict(path)
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint format {suffix or '(no suffix)'}; use .safetensors, .pkl (authors' "
            "snapshots) or .pt/.pth (state dicts)"
        )
    if found is None and cfg is None:
        raise CheckpointError(f"{path} is a plain state dict without a config: name one (e.g. --config lego_S_PG_64)")
    if found is not None and cfg is not None and _architecture(found) != _architecture(cfg):
        raise CheckpointError(f"{path} holds a {found.name} model, not {cfg.name}: leave the config out or fix it")
    model = LegoModel(found or cfg)
    _load_state(model, state, path)
    return model.eval()


def _architecture(cfg: LegoConfig) -> tuple:
    return (
        cfg.brick_sizes,
        cfg.patch_sizes,
        cfg.depths,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.img_channels,
        cfg.label_dim,
    )


def _load_state(model: LegoModel, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise CheckpointError(f"{path}: tensors do not fit {model.config.name}: " + ", ".join(parts))
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path}: tensor {key} has shape {list(tensor.shape)}, {model.config.name} needs "
                f"{list(expected[key].shape)}"
            )
        check_weights(key, tensor, path)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


# Weights are stored in these and widened to float32; an integer, bool or complex tensor is not a weight
# (casting int64 to float would silently load a wrong model).
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_weights(key: str, tensor: torch.Tensor, path: str | Path) -> None:
    """Refuse a checkpoint tensor that is not floating point or holds NaN/Inf, naming it."""
    if tensor.dtype not in WEIGHT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in WEIGHT_DTYPES)
        raise CheckpointError(
            f"{path}: tensor {key} has dtype {str(tensor.dtype).removeprefix('torch.')}, weights must be one of "
            f"{names}: not a model checkpoint, or a damaged one"
        )
    bad = tensor.numel() - int(torch.isfinite(tensor).sum())
    if bad:
        raise CheckpointError(
            f"{path}: tensor {key} holds {bad} non-finite values (NaN/Inf): training diverged or the file is "
            "damaged; use another checkpoint"
        )


def _read_safetensors(path: Path) -> tuple[LegoConfig, dict[str, torch.Tensor]]:
    meta, state = read_safetensors(path)
    if "lego_config" not in meta:
        raise CheckpointError(f"{path} has no 'lego_config' metadata: it was not written by lego_model.save_checkpoint")
    try:
        cfg = LegoConfig.from_dict(json.loads(meta["lego_config"]))
    except (ValueError, ConfigError) as err:  # JSONDecodeError is a ValueError, as is an int of > 4300 digits
        raise CheckpointError(f"{path}: bad config metadata ({str(err).splitlines()[0]})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: bad config metadata (nested too deeply)") from None
    return cfg, state


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for foreign or corrupt files
        raise CheckpointError(
            f"{path} is not a weights-only torch state dict ({type(err).__name__}: {err})".split("\n")[0]
        ) from None
    for key in ("ema", "state_dict", "model"):  # common wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping from names to tensors)")
    return dict(obj)


# --------------------------------------------------------------------------- authors' snapshots

# Bounds of reading one authors' snapshot.  A pickle can describe, in a few kilobytes and without any code, work
# without end: a module tree shared as a diamond (2^48 paths in 6 KB), a cycle, a chain 5,000 deep, millions of
# one-byte objects, dict keys whose hashes all collide, lengths far beyond the file.  The scale of the real files:
# our largest config (lego_XL_U_64) has 788 modules, 601 tensors and 7 module levels; the authors' classes add a
# few wrappers (dropout, identity, their EDM wrapper), "a few thousand modules at most".  A module pickled by torch
# costs ~117 unpickler operations (measured on this project's tiny snapshots: 12,335 operations for 105 modules),
# so 3,000 modules take ~350,000, and walking their tree ~7,000 visits (a module, a tensor or a child each).  Every
# bound is 5x or more above the real scale; a refusal costs a few seconds at most.
MAX_SNAPSHOT_OPS = 2_000_000  # unpickler operations, plus the elements of containers that calls build
MAX_SNAPSHOT_GLOBALS = 1_000  # distinct classes and functions a snapshot names (real ones: a few dozen)
MAX_GLOBAL_NAME = 1_000  # characters of one module.name a snapshot names
MAX_MODULE_DEPTH = 64  # module levels below 'ema' (real: 7 to 9)
MAX_MODULE_VISITS = 100_000  # modules, tensors and children looked at, a shared module once per path
MAX_STATE_KEY = 1_000  # characters of one state-dict key (real: ~60, "model.model.4.blocks.11.adaLN_modulation.1.bias")
_SMALL_INT = 1 << 31  # int keys below this in magnitude hash to themselves: no two collide (but -1 and -2)


class _TooCostly(pickle.UnpicklingError):
    """A snapshot that asks for more work than any real one: refused, not half-read."""


class _Record:
    """Inert stand-in for an object of a class we refuse to import: keeps name, args and state.

    ``find_class`` hands out one subclass per refused global, so that the
    unpickler's NEWOBJ/REDUCE opcodes create records instead of running code.
    """

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Record:
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items, obj.list = args, None, {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.list.append(value)

    def extend(self, values: Any) -> None:
        self.list.extend(values)

    def __repr__(self) -> str:
        return f"<record {self.qualname}>"


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    if isinstance(cls, type) and issubclass(cls, _Record):
        return cls.__new__(cls)
    if cls in (collections.OrderedDict, dict, list, set):
        return cls()
    raise pickle.UnpicklingError(f"refusing to reconstruct {reprlib.repr(cls)}")


def _newobj(cls: Any, *args: Any) -> Any:
    return _reconstructor(cls, object)


def _storage_from_bytes(data: bytes) -> Any:
    # A tensor storage serialised with torch.save; weights_only keeps this load safe too.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "tuple"): tuple,
    ("builtins", "float"): float,
    ("builtins", "int"): int,
    ("builtins", "bool"): bool,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copyreg", "__newobj__"): _newobj,
}
_PERSISTENT = ("torch_utils.persistence", "_reconstruct_persistent_obj")
# What a call of these types costs grows with its argument (a copy, a hash per element); see _check_call.
_KEYED = (dict, collections.OrderedDict, set, frozenset)
_SIZED = (list, tuple)
_NUMBERS = (int, float, bool)


def _check_key(key: Any) -> None:
    """Dict keys and set members must be names or small ints, whose hashes an attacker cannot make collide.

    CPython hashes an int by its value mod 2^61 - 1, so 100,000 keys k * (2^61 - 1) all collide and filling one
    dict with them takes minutes; str hashes are salted per process.  Real snapshots key by attribute names and
    torch's small hook ids.
    """
    if type(key) is str or key is None or type(key) is bool or (type(key) is int and -_SMALL_INT < key < _SMALL_INT):
        return
    raise pickle.UnpicklingError(f"a dict key or set member of type {type(key).__name__}; snapshots key by names")


class _SizedReader:
    """The snapshot file, refusing to read more bytes than it has left: a length in the pickle is not trusted.

    (Otherwise a 30-byte file declaring a 2^60-byte string is an allocation attempt of that size.)
    """

    def __init__(self, file: io.BufferedReader) -> None:
        self.file = file
        self.left = os.fstat(file.fileno()).st_size

    def read(self, n: int) -> bytes:
        if n > self.left:
            raise _TooCostly(f"the pickle declares {n} bytes where the file has {self.left} left")
        data = self.file.read(n)
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self.file.readline()
        self.left -= len(line)
        return line


def _charged(load: Callable[[Any], None]) -> Callable[[Any], None]:
    def charged(self: _SnapshotUnpickler) -> None:
        self.ops += 1  # inline: this runs once per opcode
        if self.ops > MAX_SNAPSHOT_OPS:
            self.charge(0)
        load(self)

    return charged


class _Dispatch(dict):
    def __missing__(self, opcode: int) -> Any:
        raise pickle.UnpicklingError(f"invalid pickle opcode {bytes([opcode])!r}")


class _SnapshotUnpickler(pickle._Unpickler):
    """Unpickles an authors' snapshot without running anything it names, and with bounded work.

    Built on the pure-Python unpickler (as joblib's NumpyUnpickler is) so that every operation is counted and
    the ones whose cost grows with their argument are checked first: keys that could collide, calls that copy a
    container, lengths beyond the file, memo indices beyond what was read.  A real snapshot's bulk is its
    tensors' bytes, each one operation, so this costs a fraction of a second more than the C unpickler.
    """

    dispatch = _Dispatch({op: _charged(load) for op, load in pickle._Unpickler.dispatch.items()})

    def __init__(self, file: io.BufferedReader) -> None:
        super().__init__(_SizedReader(file))
        self.ops = 0
        self.records: dict[str, type[_Record]] = {}

    def charge(self, n: int) -> None:
        self.ops += n
        if self.ops > MAX_SNAPSHOT_OPS:
            raise _TooCostly(
                f"it takes more than {MAX_SNAPSHOT_OPS:,} unpickling operations (a real snapshot ~350,000)"
            )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if (module, name) == _PERSISTENT:
            return self._persistent_obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return self._record_class(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not used by training snapshots")

    def _record_class(self, qualname: str) -> type[_Record]:
        if qualname not in self.records:
            if len(qualname) > MAX_GLOBAL_NAME:
                raise _TooCostly(f"it names a class of {len(qualname):,} characters")
            if len(self.records) >= MAX_SNAPSHOT_GLOBALS:
                raise _TooCostly(f"it names more than {MAX_SNAPSHOT_GLOBALS:,} classes (a real snapshot a few dozen)")
            self.records[qualname] = type("Record", (_Record,), {"qualname": qualname})
        return self.records[qualname]

    def _persistent_obj(self, meta: Any) -> _Record:
        # The authors' _reconstruct_persistent_obj would exec meta['module_src']; we only keep the data.
        meta = meta if isinstance(meta, dict) else getattr(meta, "items", {})
        name = meta.get("class_name")
        rec = self._record_class(f"persistent:{name if isinstance(name, str) else '?'}")()
        rec.state = meta.get("state")
        return rec

    def _check_call(self, func: Any, args: Any) -> None:
        """Before ``func(*args)`` (REDUCE) or ``func.__new__(func, *args)`` (NEWOBJ) of a builtin type."""
        if func not in _KEYED and func not in _SIZED and func not in _NUMBERS:
            return
        if not isinstance(args, tuple) or len(args) > 1:
            raise pickle.UnpicklingError(f"{func.__name__} called with {type(args).__name__} arguments")
        if not args:
            return
        (arg,) = args
        if func in _NUMBERS:  # int('١') is 1 and int() of 4,300 digits is slow: numbers come as numbers
            if not isinstance(arg, _NUMBERS):
                raise pickle.UnpicklingError(f"{func.__name__}() of a {type(arg).__name__}")
            return
        if not isinstance(arg, (list, tuple, set, frozenset, dict)):
            raise pickle.UnpicklingError(f"{func.__name__}() of a {type(arg).__name__}")
        self.charge(len(arg))
        if func in _KEYED:
            pairs = func in (dict, collections.OrderedDict) and not isinstance(arg, dict)
            for item in arg:
                if pairs and not (isinstance(item, (tuple, list)) and len(item) == 2):
                    raise pickle.UnpicklingError(f"{func.__name__}() of something other than pairs")
                _check_key(item[0] if pairs else item)

    def load_reduce(self) -> None:
        self._check_call(self.stack[-2], self.stack[-1])
        super().load_reduce()

    def load_newobj(self) -> None:
        self._check_call(self.stack[-2], self.stack[-1])
        super().load_newobj()

    def load_newobj_ex(self) -> None:
        self._check_call(self.stack[-3], self.stack[-2])
        super().load_newobj_ex()

    def load_dict(self) -> None:  # the items since the mark: key, value, key, value, ...
        for key in self.stack[::2]:
            _check_key(key)
        super().load_dict()

    def load_setitem(self) -> None:
        _check_key(self.stack[-2])
        super().load_setitem()

    def load_setitems(self) -> None:
        for key in self.stack[::2]:
            _check_key(key)
        super().load_setitems()

    def load_additems(self) -> None:
        for key in self.stack:
            _check_key(key)
        super().load_additems()

    def load_frozenset(self) -> None:
        for key in self.stack:
            _check_key(key)
        super().load_frozenset()

    def load_bytearray8(self) -> None:
        # bytearray(n) would allocate and zero n declared bytes before reading any; read them first (bounded).
        (n,) = struct.unpack("<Q", self.read(8))
        self.stack.append(bytearray(self.read(n)))

    def load_put(self) -> None:  # protocol 0's text index: bounded, so memo keys cannot be made to collide
        line = self.readline()[:-1]
        index = int(line) if line.isdigit() and len(line) <= len(str(MAX_SNAPSHOT_OPS)) else -1
        if not 0 <= index <= self.ops:
            shown = line[:20].decode("ascii", "replace")
            raise pickle.UnpicklingError(f"memo index {shown} is not one of the objects read so far")
        self.memo[index] = self.stack[-1]


for _opcode, _name in (
    (pickle.REDUCE, "load_reduce"),
    (pickle.NEWOBJ, "load_newobj"),
    (pickle.NEWOBJ_EX, "load_newobj_ex"),
    (pickle.DICT, "load_dict"),
    (pickle.SETITEM, "load_setitem"),
    (pickle.SETITEMS, "load_setitems"),
    (pickle.ADDITEMS, "load_additems"),
    (pickle.FROZENSET, "load_frozenset"),
    (pickle.BYTEARRAY8, "load_bytearray8"),
    (pickle.PUT, "load_put"),
):
    _SnapshotUnpickler.dispatch[_opcode[0]] = _charged(getattr(_SnapshotUnpickler, _name))


def _attrs(obj: Any) -> dict:
    """The attribute dict of a recorded module (state may be a dict or (dict, slots))."""
    state = obj.state if isinstance(obj, _Record) else None
    if isinstance(state, tuple) and state and isinstance(state[0], dict):
        state = state[0]
    if isinstance(state, _Record):  # dnnlib.EasyDict state
        state = state.items
    return state if isinstance(state, dict) else {}


def _as_dict(obj: Any) -> dict:
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, _Record):  # an EasyDict or similar dict subclass
        return dict(obj.items) or _attrs(obj)
    return {}


def _names(value: Any) -> set[str]:
    """The names in a recorded ``_non_persistent_buffers_set`` (a set, or the list a protocol-2 set is built from)."""
    return {v for v in value if isinstance(v, str)} if isinstance(value, (set, frozenset, list, tuple)) else set()


def _collect_tensors(root: Any) -> dict[str, torch.Tensor]:
    """The state dict of a recorded module tree: every parameter and persistent buffer under its dotted name.

    Walked with an explicit stack (no recursion) and bounded: :data:`MAX_MODULE_DEPTH` levels,
    :data:`MAX_MODULE_VISITS` modules, tensors and children looked at (a module shared by two parents is
    visited, and named, once per path, as ``nn.Module.state_dict`` does), keys of :data:`MAX_STATE_KEY`
    characters; a module that contains itself is a cycle.  Any of these raises :class:`_TooCostly`.
    """
    out: dict[str, torch.Tensor] = {}
    visits = 0
    on_path: dict[int, str] = {}  # id -> name of the modules from the root to the one being expanded
    stack: list[tuple[Any, str, int, bool]] = [(root, "", 0, False)]  # (module, key prefix, depth, leaving)

    def visit(n: int = 1) -> None:
        nonlocal visits
        visits += n
        if visits > MAX_MODULE_VISITS:
            raise _TooCostly(
                f"its module tree takes more than {MAX_MODULE_VISITS:,} visits (shared modules count once per path; "
                "a real snapshot takes ~7,000)"
            )

    def key(prefix: str, name: Any) -> str:
        if not isinstance(name, str):
            raise _TooCostly(f"a module or tensor under {prefix or 'ema'!r} is named by a {type(name).__name__}")
        if len(prefix) + len(name) > MAX_STATE_KEY:
            raise _TooCostly(f"a state-dict key under {prefix[:40]!r}... is longer than {MAX_STATE_KEY} characters")
        return prefix + name

    while stack:
        module, prefix, depth, leaving = stack.pop()
        if leaving:
            del on_path[id(module)]
            continue
        visit()
        if id(module) in on_path:
            again = prefix.rstrip(".")
            raise _TooCostly(f"its module tree has a cycle: {again} is {on_path[id(module)] or 'ema'} again")
        if depth > MAX_MODULE_DEPTH:
            raise _TooCostly(f"its module tree is more than {MAX_MODULE_DEPTH} levels deep (a real one ~8)")
        on_path[id(module)] = prefix.rstrip(".")
        stack.append((module, prefix, depth, True))
        attrs = _attrs(module)
        skip = _names(attrs.get("_non_persistent_buffers_set"))
        visit(len(skip))
        for group in ("_parameters", "_buffers"):
            for name, tensor in _as_dict(attrs.get(group)).items():
                visit()
                name = key(prefix, name)
                if isinstance(tensor, torch.Tensor) and name[len(prefix) :] not in skip:
                    out[name] = tensor.detach()
        children = _as_dict(attrs.get("_modules"))
        visit(len(children))
        for name, child in reversed(children.items()):  # reversed onto the stack: visited in order
            if child is not None:
                stack.append((child, key(prefix, name) + ".", depth + 1, False))
    return out


def _setting(path: Path, name: str, value: Any) -> Any:
    """A network setting of the snapshot as it is, if it is a plain value (LegoConfig checks its type and range).

    Anything else is refused here: a nested list would make the config's message recurse, an int of 5,000 digits
    could not be printed in it, and a megabyte of text would be the message.
    """
    plain = value is None or isinstance(value, (bool, float)) or (isinstance(value, int) and abs(value) < 1 << 63)
    if plain or (isinstance(value, str) and len(value) <= 100):
        return value
    shown = f"{len(value):,} characters" if isinstance(value, str) else type(value).__name__
    raise CheckpointError(f"{path}: the snapshot's {name} is not a number or a name ({shown}); not a LEGO snapshot")


def _read_snapshot(path: Path) -> tuple[LegoConfig, dict[str, torch.Tensor]]:
    try:
        with open(path, "rb") as f:
            data = _SnapshotUnpickler(f).load()
    except _TooCostly as err:
        raise CheckpointError(f"{path} is refused: {err}; not a training snapshot, or a hostile one") from None
    except Exception as err:  # pickle raises many types for corrupt input
        detail = str(err).splitlines()[0][:200] if str(err) else ""
        raise CheckpointError(f"{path} is not a readable training snapshot ({type(err).__name__}: {detail})") from None
    if not isinstance(data, dict) or "ema" not in data:
        raise CheckpointError(f"{path} has no 'ema' network: not one of the authors' network-snapshot-*.pkl files")
    ema = data["ema"]
    if not (isinstance(ema, _Record) and ema.qualname == "persistent:EDMPrecondLEGO"):
        name = getattr(ema, "qualname", type(ema).__name__)
        raise CheckpointError(f"{path}: 'ema' is {name[:100]}, expected the authors' EDMPrecondLEGO")
    attrs = _attrs(ema)
    kwargs = _as_dict(attrs.get("_init_kwargs"))

    def setting(name: str, default: Any, *, in_attrs: bool = True) -> Any:
        return _setting(path, name, kwargs.get(name, attrs.get(name, default) if in_attrs else default))

    model_type = setting("model_type", None, in_attrs=False)
    try:
        base = get_config(str(model_type))
    except ConfigError as err:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported ({err})") from None
    resolution = setting("img_resolution", base.resolution)
    try:  # the values are the snapshot's as they are: LegoConfig checks their types and ranges
        cfg = LegoConfig.from_dict(
            {
                **base.to_dict(),
                "img_channels": setting("img_channels", base.img_channels),
                "label_dim": setting("label_dim", 0) or 0,
                "sigma_data": setting("sigma_data", 0.5),
                "augment_dim": setting("augment_dim", 0, in_attrs=False) or 0,
                "resolution": resolution if isinstance(resolution, int) else base.resolution,
            }
        )
    except ConfigError as err:
        raise CheckpointError(f"{path}: the snapshot's network settings are not a valid config ({err})") from None
    try:
        return cfg, _collect_tensors(ema)
    except _TooCostly as err:
        raise CheckpointError(f"{path} is refused: {err}; not a training snapshot, or a hostile one") from None
