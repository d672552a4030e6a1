"""Checkpoint formats, round trips, and snapshots that must not run the code they carry."""

from __future__ import annotations

import builtins
import pickle
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


@pytest.fixture
def snapshot_modules():
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    yield
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v


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
