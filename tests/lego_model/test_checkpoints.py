"""Checkpoint formats, round trips, and snapshots that must not run the code they carry."""

from __future__ import annotations

import builtins
import contextlib
import pickle
import signal
import struct
import sys
import types
from pathlib import Path

import pytest
import torch

from lego_model import CheckpointError, LegoModel, get_config, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def model():
    return LegoModel(get_config("tiny_PG_16")).randomize_(3).eval()


def _same_weights(a: LegoModel, b: LegoModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_safetensors_round_trip(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    _same_weights(model, loaded)


def test_safetensors_config_must_agree(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="holds a tiny_PG_16 model, not tiny_U_16"):
        load_checkpoint(path, "tiny_U_16")


def test_state_dict_round_trip_needs_a_config(model, tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    _same_weights(model, load_checkpoint(path, "tiny_PG_16"))
    with pytest.raises(CheckpointError, match="without a config: name one"):
        load_checkpoint(path)


def test_tensors_that_do_not_fit_name_the_file_and_tensor(model, tmp_path):
    path = tmp_path / "m.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"m.pth: tensors do not fit tiny_U_16: .*missing"):
        load_checkpoint(path, "tiny_U_16")
    state = model.state_dict()
    state["model.model.0.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"attn.qkv.weight has shape \[3, 3\]"):
        load_checkpoint(path, "tiny_PG_16")


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("m.bin", b"x", "unknown checkpoint format .bin"),
        ("m.safetensors", b"not a safetensors file", "not a readable safetensors file"),
        ("m.pkl", b"garbage", "not a readable training snapshot"),
        ("m.pt", b"garbage", "not a weights-only torch state dict"),
    ],
)
def test_unreadable_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, "tiny_PG_16")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


# --------------------------------------------------------------------------- authors' snapshots


def _write_snapshot(
    model: LegoModel, path: Path, module_src: str, model_type: str = "tiny_PG_16", resolution: int = 16
) -> None:
    """Write a pickle laid out like the authors' network-snapshot-*.pkl.

    Their torch_utils.persistence stores the EDMPrecondLEGO as a call of
    _reconstruct_persistent_obj(meta) whose meta carries the module's source,
    which plain unpickling executes.  We register a stand-in module under that
    name that does the same, so the file is genuinely hostile to pickle.load.
    """
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        namespace: dict = {}
        exec(meta["module_src"], namespace)  # what the real loader does with the embedded source
        return meta

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package = types.ModuleType("torch_utils")
    package.persistence = persistence
    sys.modules["torch_utils"], sys.modules["torch_utils.persistence"] = package, persistence

    class Persistent:
        def __init__(self, class_name: str, state: dict) -> None:
            self.meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)

        def __reduce__(self):
            return (_reconstruct_persistent_obj, (self.meta,))

    state = {k: v for k, v in model.__dict__.items() if k != "config"}
    state["_init_args"] = ()
    state["_init_kwargs"] = dict(
        img_resolution=resolution, img_channels=3, label_dim=10, model_type=model_type, use_fp16=False, augment_dim=0
    )
    data = dict(
        ema=Persistent("EDMPrecondLEGO", state),
        loss_fn=Persistent("LEGOEDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}),
        augment_pipe=None,
        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="/data", resolution=resolution),
    )
    path.write_bytes(pickle.dumps(data))


def test_authors_snapshot_loads_without_running_its_code(model, tmp_path, snapshot_modules):
    marker = tmp_path / "pwned"
    path = tmp_path / "network-snapshot-000100.pkl"
    _write_snapshot(model, path, module_src=f"open({str(marker)!r}, 'w').write('ran')")

    # The file really is hostile: plain unpickling runs the embedded source.
    pickle.loads(path.read_bytes())
    assert marker.exists()
    marker.unlink()

    loaded = load_checkpoint(path)
    assert not marker.exists()
    assert loaded.config.name == "tiny_PG_16" and loaded.config.label_dim == 10
    _same_weights(model, loaded)
    x, sigma, labels = torch.randn(1, 3, 16, 16), torch.tensor([1.5]), torch.eye(10)[[4]]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, labels), model(x, sigma, labels), atol=0, rtol=0)


def test_snapshot_of_unknown_architecture(model, tmp_path, snapshot_modules):
    path = tmp_path / "network-snapshot-000100.pkl"
    _write_snapshot(model, path, module_src="", model_type="lego_Q_PG_64")
    with pytest.raises(CheckpointError, match="model_type 'lego_Q_PG_64' is not supported"):
        load_checkpoint(path)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.parametrize("wrap", [lambda e: e, lambda e: {"ema": e}, lambda e: {"ema": 1, "x": [e]}])
def test_pickle_exploits_do_not_run(tmp_path, wrap):
    marker = tmp_path / "pwned"
    path = tmp_path / "network-snapshot-000000.pkl"
    path.write_bytes(pickle.dumps(wrap(_Exploit(marker))))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_state_dict_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "m.pt"
    torch.save({"state_dict": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="not a weights-only torch state dict"):
        load_checkpoint(path, "tiny_PG_16")
    assert not marker.exists()


# --------------------------------------------------------------------------- snapshots that cost without running code
# (issue 21, class 3).  Each is a few bytes to a few MB of plain pickle opcodes naming nothing dangerous; before the
# unpickler bounded its work they hung (the diamond: 2^48 paths), recursed to a RecursionError traceback (a cycle,
# a 5,000-level chain) or asked for minutes of hashing or terabytes of memory.


class _SnapshotWriter:
    """Protocol-2 opcodes of an authors'-layout snapshot, written node by node, children first.

    Modules are memoized and referenced by index, so any shape (shared, cyclic, deep) is a short pickle written
    without recursion, which ``pickle.dumps`` of such a tree could not do.
    """

    def __init__(self) -> None:
        self.out = bytearray(pickle.PROTO + b"\x02")
        self.memo = 0

    def text(self, s: str) -> None:
        b = s.encode()
        self.out += pickle.BINUNICODE + struct.pack("<I", len(b)) + b

    def get(self, index: int) -> None:
        self.out += pickle.LONG_BINGET + struct.pack("<I", index)

    def put(self) -> int:
        self.out += pickle.LONG_BINPUT + struct.pack("<I", self.memo)
        self.memo += 1
        return self.memo - 1

    def dict(self, items: dict) -> None:
        """A dict whose values are written by the callables ``items`` maps its keys to."""
        self.out += pickle.EMPTY_DICT
        if items:
            self.out += pickle.MARK
            for key, write in items.items():
                self.text(key) if isinstance(key, str) else self.out.extend(pickle.BININT1 + bytes([key]))
                write()
            self.out += pickle.SETITEMS

    def module(self) -> int:
        """A new module record (its state comes with :meth:`build`), memoized."""
        self.out += pickle.GLOBAL + b"torch.nn.modules.container\nSequential\n" + pickle.EMPTY_TUPLE + pickle.NEWOBJ
        index = self.put()
        self.out += pickle.POP
        return index

    def build(self, index: int, children: dict, **attrs) -> None:
        self.get(index)
        state = {"_parameters": lambda: self.dict({}), "_buffers": lambda: self.dict({}), **attrs}
        state["_modules"] = lambda: self.dict({name: (lambda c=c: self.get(c)) for name, c in children.items()})
        self.dict(state)
        self.out += pickle.BUILD + pickle.POP

    def snapshot(self, root: int, **kwargs) -> bytes:
        """{'ema': EDMPrecondLEGO record whose model is ``root``}, kwargs written as given (default: tiny_PG_16)."""
        self.out += pickle.EMPTY_DICT
        self.text("ema")
        self.out += pickle.GLOBAL + b"torch_utils.persistence\n_reconstruct_persistent_obj\n"
        init = {"model_type": lambda: self.text("tiny_PG_16"), **kwargs}
        state = {
            "_modules": lambda: self.dict({"model": lambda: self.get(root)}),
            "_init_kwargs": lambda: self.dict(init),
        }
        self.dict({"class_name": lambda: self.text("EDMPrecondLEGO"), "state": lambda: self.dict(state)})
        self.out += pickle.TUPLE1 + pickle.REDUCE + pickle.SETITEM + pickle.STOP
        return bytes(self.out)


def _tree(levels: int, fan_out: int = 1, **attrs) -> bytes:
    """A chain of modules ``levels`` deep; with fan_out 2 each level references the one below twice (a diamond)."""
    w = _SnapshotWriter()
    node = w.module()
    w.build(node, {}, **attrs)
    for _ in range(levels):
        parent = w.module()
        w.build(parent, {f"c{i}": node for i in range(fan_out)})
        node = parent
    return w.snapshot(node)


def _cycle() -> bytes:
    w = _SnapshotWriter()
    a, b = w.module(), w.module()
    w.build(a, {"b": b})
    w.build(b, {"a": a})
    return w.snapshot(a)


def _deep_list_setting(levels: int) -> bytes:
    """A model_type that is a list nested ``levels`` deep (built on the unpickler's stack, no recursion)."""
    w = _SnapshotWriter()
    root = w.module()
    w.build(root, {})
    nested = lambda: w.out.extend(pickle.EMPTY_LIST * levels + pickle.APPEND * (levels - 1))  # noqa: E731
    return w.snapshot(root, model_type=nested)


_M61 = (1 << 61) - 1  # CPython hashes an int by its value mod 2^61 - 1: k * _M61 + 5 all collide


def _long(value: int) -> bytes:
    data = value.to_bytes(16, "little", signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data


HOSTILE_SNAPSHOTS = {
    "diamond of 48 levels": (lambda: _tree(48, fan_out=2), "more than 100,000 visits"),
    "diamond of 16 levels": (lambda: _tree(16, fan_out=2), "more than 100,000 visits"),
    "cycle": (_cycle, "has a cycle: model.b.a is model again"),
    "chain 5,000 deep": (lambda: _tree(5000), "more than 64 levels deep"),
    "chain 65 levels deep": (lambda: _tree(64), "more than 64 levels deep"),  # 'model' and 64 below it
    "wide: 3 million objects": (
        lambda: pickle.PROTO + b"\x02" + pickle.MARK + pickle.EMPTY_LIST * 3_000_000 + pickle.LIST + pickle.STOP,
        "more than 2,000,000 unpickling operations",
    ),
    "wide: 10,000 copies of a 100,000-item list": (
        lambda: (
            pickle.PROTO
            + b"\x02"
            + pickle.EMPTY_LIST
            + pickle.MARK
            + pickle.NONE * 100_000
            + pickle.APPENDS
            + pickle.BINPUT
            + b"\x00"
            + pickle.GLOBAL
            + b"builtins\ntuple\n"
            + pickle.BINPUT
            + b"\x01"
            + pickle.POP
            + pickle.MARK
            + (pickle.BINGET + b"\x01" + pickle.BINGET + b"\x00" + pickle.TUPLE1 + pickle.REDUCE) * 10_000
            + pickle.LIST
            + pickle.STOP
        ),
        "more than 2,000,000 unpickling operations",
    ),
    "dict of 100,000 colliding keys": (
        lambda: (
            pickle.PROTO
            + b"\x02"
            + pickle.EMPTY_DICT
            + pickle.MARK
            + b"".join(_long(i * _M61 + 5) + pickle.NONE for i in range(100_000))
            + pickle.SETITEMS
            + pickle.STOP
        ),
        "a dict key or set member of type int",
    ),
    "set() of 100,000 colliding members": (
        lambda: (
            pickle.PROTO
            + b"\x02"
            + pickle.GLOBAL
            + b"builtins\nfrozenset\n"
            + pickle.EMPTY_LIST
            + pickle.MARK
            + b"".join(_long(i * _M61 + 5) for i in range(100_000))
            + pickle.APPENDS
            + pickle.TUPLE1
            + pickle.REDUCE
            + pickle.STOP
        ),
        "a dict key or set member of type int",
    ),
    "memo indices that collide": (
        lambda: b"N" + b"".join(b"p%d\n" % (i * _M61 + 5) for i in range(50_000)) + b".",
        "memo index 5 is not one of the objects read so far",
    ),
    "bytes declared 2^60 long": (
        lambda: pickle.PROTO + b"\x04" + pickle.BINBYTES8 + struct.pack("<Q", 1 << 60) + b"x" * 10,
        "declares 1152921504606846976 bytes where the file has 10 left",
    ),
    "str declared 2^40 long": (
        lambda: pickle.PROTO + b"\x04" + pickle.BINUNICODE8 + struct.pack("<Q", 1 << 40) + b"x" * 10,
        "declares 1099511627776 bytes",
    ),
    "bytearray declared 64 GiB": (
        lambda: pickle.PROTO + b"\x05" + pickle.BYTEARRAY8 + struct.pack("<Q", 1 << 36) + b"x" * 10,
        "declares 68719476736 bytes",
    ),
    "frame declared 2^50 long": (
        lambda: pickle.PROTO + b"\x04" + pickle.FRAME + struct.pack("<Q", 1 << 50) + b"x",
        "declares 1125899906842624 bytes",
    ),
    "5,000 classes": (
        lambda: (
            pickle.PROTO
            + b"\x02"
            + pickle.MARK
            + b"".join(b"cm%d\nC\n" % i for i in range(5000))
            + pickle.LIST
            + pickle.STOP
        ),
        "names more than 1,000 classes",
    ),
    "a class name of 2 MB": (
        lambda: pickle.PROTO + b"\x02" + pickle.GLOBAL + b"m" * 2_000_000 + b"\nC\n" + pickle.STOP,
        "names a class of 2,000,002 characters",
    ),
    "int() of Arabic-Indic text": (
        lambda: (
            pickle.PROTO
            + b"\x02"
            + pickle.GLOBAL
            + b"builtins\nint\n"
            + pickle.SHORT_BINUNICODE
            + bytes([2])
            + "\u0661".encode()
            + pickle.TUPLE1
            + pickle.REDUCE
            + pickle.STOP
        ),
        "int() of a str",
    ),
    "model_type nested 5,000 deep": (lambda: _deep_list_setting(5000), "model_type is not a number or a name (list)"),
    "img_channels of 5,000 digits": (lambda: _huge_setting(), "img_channels is not a number or a name (int)"),
    "a module named by an int": (lambda: _named_by_int(), "a module or tensor under 'model.' is named by a int"),
    # set([[1]]) would raise TypeError (a traceback before); such names are not names, and the tensors do not fit
    "unhashable non-persistent buffer names": (lambda: _unhashable_names(), "tensors do not fit tiny_PG_16"),
}


def _named_by_int() -> bytes:
    w = _SnapshotWriter()
    leaf, root = w.module(), w.module()
    w.build(leaf, {})
    w.build(root, {7: leaf})
    return w.snapshot(root)


def _huge_setting() -> bytes:
    w = _SnapshotWriter()
    root = w.module()
    w.build(root, {})
    huge = (10**5000 - 1).to_bytes(2100, "little", signed=True)
    return w.snapshot(root, img_channels=lambda: w.out.extend(pickle.LONG4 + struct.pack("<i", len(huge)) + huge))


def _unhashable_names() -> bytes:
    w = _SnapshotWriter()
    root = w.module()
    list_of_list = pickle.EMPTY_LIST + pickle.EMPTY_LIST + pickle.BININT1 + b"\x01" + pickle.APPEND + pickle.APPEND
    w.build(root, {}, _non_persistent_buffers_set=lambda: w.out.extend(list_of_list))
    return w.snapshot(root)


@contextlib.contextmanager
def _hang_guard(seconds: int = 120):
    """Turn a hang into a failure (these loads take well under a second to a few seconds; before, minutes or more)."""

    def hung(signum, frame):
        raise AssertionError(f"still loading after {seconds} s: the load is not bounded")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refused_in_one_line(path: Path, fragment: str) -> str:
    with _hang_guard(), pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert fragment in message, message
    return message


@pytest.mark.parametrize("name", HOSTILE_SNAPSHOTS)
def test_snapshots_that_cost_without_running_code_are_refused_in_one_line(tmp_path, name):
    make, fragment = HOSTILE_SNAPSHOTS[name]
    path = tmp_path / "network-snapshot-000000.pkl"
    path.write_bytes(make())
    refused_in_one_line(path, fragment)


def test_bounds_leave_room_for_real_trees(tmp_path):
    """A chain at the depth bound, a module shared 2^12 times over (4,096 paths) and 2,000 children still load as
    far as their tensors: they are refused because they hold none of tiny_PG_16's, not because of a bound."""
    w = _SnapshotWriter()
    leaves = [w.module() for _ in range(2000)]
    for leaf in leaves:
        w.build(leaf, {})
    wide = w.module()
    w.build(wide, {str(i): leaf for i, leaf in enumerate(leaves)})
    cases = {"deep": _tree(63), "shared": _tree(12, fan_out=2), "wide": w.snapshot(wide)}
    for name, data in cases.items():
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(data)
        refused_in_one_line(path, "tensors do not fit tiny_PG_16: 75 missing")


def test_a_real_snapshot_is_well_inside_the_bounds(model, tmp_path, snapshot_modules):
    from lego_model import checkpoints

    path = tmp_path / "network-snapshot-000100.pkl"
    _write_snapshot(model, path, module_src="")
    with open(path, "rb") as f:
        unpickler = checkpoints._SnapshotUnpickler(f)
        data = unpickler.load()
    # 105 modules take ~12,000 operations: the bound allows ~17,000 modules, "a few thousand" are the real scale.
    assert 1_000 < unpickler.ops < checkpoints.MAX_SNAPSHOT_OPS / 100
    assert len(checkpoints._collect_tensors(data["ema"])) == len(model.state_dict())
