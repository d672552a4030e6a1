"""Loading and saving checkpoints.

Formats, chosen by suffix:

* ``.safetensors``: our own format; the config travels as JSON in the metadata.
* ``.pkl``: the authors' training snapshots (``network-snapshot-*.pkl``), a
  pickled dict whose ``'ema'`` entry is an EDMPrecondLEGO saved with their
  torch_utils.persistence.  Such a file embeds Python source that plain
  unpickling would execute.  :class:`_SnapshotUnpickler` executes nothing: it
  resolves only a short list of tensor-rebuilding functions and turns every
  other class or callable into an inert record of its name and arguments, from
  which we read the constructor kwargs and the tensors.
* ``.pt`` / ``.pth``: a plain state dict, read with ``torch.load(weights_only=True)``;
  these carry no config, so one must be named.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lego_model.configs import LegoConfig, get_config
from lego_model.errors import CheckpointError, ConfigError
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
    """Write tensors and metadata to a temporary name beside ``path``, then rename: no half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
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


class _Record:
    """Inert stand-in for an object of a class we refuse to import: keeps name, args and state.

    ``find_class`` hands out a fresh subclass per refused global, so that the
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


def _record_class(qualname: str) -> type[_Record]:
    return type("Record", (_Record,), {"qualname": qualname})


def _persistent_obj(meta: Any) -> _Record:
    # The authors' _reconstruct_persistent_obj would exec meta['module_src']; we only keep the data.
    meta = meta if isinstance(meta, dict) else getattr(meta, "items", {})
    rec = _record_class(f"persistent:{meta.get('class_name', '?')}")()
    rec.state = meta.get("state")
    return rec


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    if isinstance(cls, type) and issubclass(cls, _Record):
        return cls.__new__(cls)
    if cls in (collections.OrderedDict, dict, list, set):
        return cls()
    raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")


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
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_obj,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copyreg", "__newobj__"): _newobj,
}


class _SnapshotUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _record_class(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not used by training snapshots")


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


def _collect_tensors(module: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    attrs = _attrs(module)
    skip = set(attrs.get("_non_persistent_buffers_set", ()) or ())
    for group in ("_parameters", "_buffers"):
        for name, tensor in _as_dict(attrs.get(group, {})).items():
            if isinstance(tensor, torch.Tensor) and name not in skip:
                out[prefix + name] = tensor.detach()
    for name, child in _as_dict(attrs.get("_modules", {})).items():
        if child is not None:
            _collect_tensors(child, f"{prefix}{name}.", out)


def _read_snapshot(path: Path) -> tuple[LegoConfig, dict[str, torch.Tensor]]:
    try:
        with open(path, "rb") as f:
            data = _SnapshotUnpickler(f).load()
    except Exception as err:  # pickle raises many types for corrupt input
        raise CheckpointError(f"{path} is not a readable training snapshot ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or "ema" not in data:
        raise CheckpointError(f"{path} has no 'ema' network: not one of the authors' network-snapshot-*.pkl files")
    ema = data["ema"]
    if not (isinstance(ema, _Record) and ema.qualname == "persistent:EDMPrecondLEGO"):
        name = getattr(ema, "qualname", type(ema).__name__)
        raise CheckpointError(f"{path}: 'ema' is {name}, expected the authors' EDMPrecondLEGO")
    attrs = _attrs(ema)
    kwargs = _as_dict(attrs.get("_init_kwargs"))
    model_type = kwargs.get("model_type")
    try:
        base = get_config(str(model_type))
    except ConfigError as err:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not supported ({err})") from None
    resolution = kwargs.get("img_resolution", attrs.get("img_resolution", base.resolution))
    try:  # the values are the snapshot's as they are: LegoConfig checks their types and ranges
        cfg = LegoConfig.from_dict(
            {
                **base.to_dict(),
                "img_channels": kwargs.get("img_channels", attrs.get("img_channels", base.img_channels)),
                "label_dim": kwargs.get("label_dim", attrs.get("label_dim", 0)) or 0,
                "sigma_data": kwargs.get("sigma_data", attrs.get("sigma_data", 0.5)),
                "augment_dim": kwargs.get("augment_dim", 0) or 0,
                "resolution": resolution if isinstance(resolution, int) else base.resolution,
            }
        )
    except ConfigError as err:
        raise CheckpointError(f"{path}: the snapshot's network settings are not a valid config ({err})") from None
    state: dict[str, torch.Tensor] = {}
    _collect_tensors(ema, "", state)
    return cfg, state
