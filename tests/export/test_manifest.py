"""manifest.json: round trip and every refusal of load_manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.errors import ManifestError, ProfileError
from export.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    EngineEntry,
    Manifest,
    Profile,
    TensorSpec,
    file_sha256,
    load_manifest,
    write_manifest,
)
from lego_model.configs import get_config
from lego_model.errors import LegoError, ShapeError

PROFILE = Profile(batch=(1, 1, 8), height=(16, 16, 64), width=(16, 32, 64))


def _entry(engine_dir: Path, name: str, payload: bytes, fmt: str = "onnx") -> EngineEntry:
    file = f"{name}.{'onnx' if fmt == 'onnx' else 'plan'}"
    (engine_dir / file).write_bytes(payload)
    brick = None if name == "embedder" else int(name.removeprefix("brick"))
    return EngineEntry(
        name=name,
        kind="embedder" if brick is None else "brick",
        brick=brick,
        file=file,
        format=fmt,
        precision="fp32",
        inputs=[TensorSpec("x_in", "float32", ["B", 5, "H", "W"]), TensorSpec("cond", "float32", ["B", 64])],
        outputs=[TensorSpec("f", "float32", ["B", 3, "H", "W"])],
        profile=PROFILE,
        sha256=file_sha256(engine_dir / file),
        bytes=len(payload),
        built_with={"torch": "2.13.0", "gpu": None, "compute_capability": None},
        verification={"16x16": {"max_abs": 1e-6, "max_rel": 1e-5}},
    )


@pytest.fixture
def engine_dir(tmp_path: Path) -> Path:
    d = tmp_path / "engines"
    d.mkdir()
    entries = [_entry(d, "embedder", b"embedder bytes")] + [_entry(d, f"brick{k}", b"brick %d" % k) for k in range(3)]
    manifest = Manifest(
        config=get_config("tiny_PG_16"),
        checkpoint={"path": None, "sha256": None, "random_init_seed": 0},
        engines=entries,
    )
    write_manifest(manifest, d)
    return d


def _edit(engine_dir: Path, change) -> None:
    path = engine_dir / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _refused(engine_dir: Path, *fragments: str) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(engine_dir)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_round_trip(engine_dir: Path) -> None:
    m = load_manifest(engine_dir)
    assert m.schema_version == SCHEMA_VERSION
    assert m.config == get_config("tiny_PG_16")
    assert list(m.engines_for("onnx")) == ["embedder", "brick0", "brick1", "brick2"]
    assert m.engines_for("tensorrt") == {}
    assert m.engines_for("onnx")["brick1"].profile == PROFILE
    assert m.engines_for("onnx")["brick1"].inputs[0].shape == ["B", 5, "H", "W"]
    assert Manifest.from_dict(json.loads(m.to_json())) == m
    assert m.engines_for("onnx")["brick0"].path(engine_dir).read_bytes() == b"brick 0"


def test_engines_for_unknown_format(engine_dir: Path) -> None:
    with pytest.raises(ManifestError, match="unknown engine format"):
        load_manifest(engine_dir).engines_for("tflite")


def test_tampered_file(engine_dir: Path) -> None:
    (engine_dir / "brick1.onnx").write_bytes(b"brick 9")  # same size, other content
    _refused(engine_dir, "brick1.onnx", "sha256", "lego-export --force")
    assert load_manifest(engine_dir, verify_hashes=False).engines[2].name == "brick1"


def test_missing_file(engine_dir: Path) -> None:
    (engine_dir / "brick2.onnx").unlink()
    _refused(engine_dir, "brick2.onnx", "missing")


@pytest.mark.parametrize("file", ["../outside.onnx", "/etc/passwd", "a/../../b.onnx", "C:\\x.onnx", ".", ""])
def test_path_escape(engine_dir: Path, file: str) -> None:
    _edit(engine_dir, lambda d: d["engines"][1].update(file=file))
    _refused(engine_dir, "relative path inside the engine directory" if file != "." else "directory itself")


def test_symlink_escape(engine_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"brick 0")
    (engine_dir / "brick0.onnx").unlink()
    (engine_dir / "brick0.onnx").symlink_to(outside)
    _refused(engine_dir, "outside")


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_bad_schema_version(engine_dir: Path, version) -> None:
    _edit(engine_dir, lambda d: d.update(schema_version=version))
    _refused(engine_dir, "schema version", str(SCHEMA_VERSION))


def test_corrupt_json(engine_dir: Path) -> None:
    path = engine_dir / MANIFEST_NAME
    path.write_text(path.read_text()[:-40])
    _refused(engine_dir, "not valid JSON", "--force")


def test_missing_manifest_and_directory(engine_dir: Path, tmp_path: Path) -> None:
    (engine_dir / MANIFEST_NAME).unlink()
    _refused(engine_dir, "no manifest.json", "lego-export")
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda d: d.pop("engines"), "'engines' is missing"),
        (lambda d: d.pop("config"), "'config' is missing"),
        (lambda d: d["config"].update(hidden_size=63), "invalid model config"),
        (lambda d: d["checkpoint"].pop("sha256"), "checkpoint lacks 'sha256'"),
        (lambda d: d["engines"][0].pop("sha256"), "'sha256' is missing"),
        (lambda d: d["engines"][0].update(sha256="xyz"), "64 lowercase hex"),
        (lambda d: d["engines"][0].update(format="tflite"), "format 'tflite'"),
        (lambda d: d["engines"][0].update(precision="int8"), "precision 'int8'"),
        (lambda d: d["engines"][1]["inputs"][0].update(dtype="int64"), "dtype 'int64'"),
        (lambda d: d["engines"][1]["inputs"][0].update(shape=["B", 5, "Z", "W"]), "shape entry 'Z'"),
        (lambda d: d["engines"][1]["profile"].update(batch=[4, 2, 8]), "MIN <= OPT <= MAX"),
        (lambda d: d["engines"][1].update(brick=7, name="brick7"), "claims brick 7"),
        (lambda d: d["engines"][2].update(name="brick0", brick=0), "listed twice"),
        (lambda d: d["engines"][0].update(bytes="12"), "should be int"),
    ],
)
def test_malformed_fields(engine_dir: Path, change, fragment: str) -> None:
    _edit(engine_dir, change)
    _refused(engine_dir, fragment)


def test_write_manifest_refuses_invalid(tmp_path: Path) -> None:
    bad = Manifest(config=get_config("tiny_PG_16"), checkpoint={"path": None}, engines=[])
    with pytest.raises(ManifestError, match="checkpoint lacks"):
        write_manifest(bad, tmp_path)
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_profile_check() -> None:
    PROFILE.check(8, 16, 64)
    assert PROFILE.contains(1, 64, 16)
    with pytest.raises(ProfileError) as info:
        PROFILE.check(9, 16, 128)
    message = str(info.value)
    assert isinstance(info.value, ShapeError) and isinstance(info.value, LegoError)
    assert "batch 9 not in [1, 8]" in message and "width 128 not in [16, 64]" in message
    assert "batch 1..8 (opt 1), height 16..64 (opt 16), width 16..64 (opt 32)" in message
    assert "height 16 not in" not in message  # only the sizes that are out of range are named


@pytest.mark.parametrize(
    "ranges", [((0, 1, 8),), ((2, 1, 8),), ((1, 9, 8),), ((1, 8),), ((1.0, 2, 3),), ((True, 1, 1),)]
)
def test_profile_rejects_bad_ranges(ranges) -> None:
    with pytest.raises(ProfileError):
        Profile(batch=ranges[0], height=(16, 16, 16), width=(16, 16, 16))
