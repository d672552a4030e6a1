"""manifest.json: round trip and every refusal of load_manifest."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from export.errors import ManifestError, ProfileError
from export.identity import engine_identity
from export.manifest import MANIFEST_NAME, load_manifest, write_manifest
from export.records import (
    SCHEMA_VERSION,
    BuiltWith,
    CheckpointRecord,
    EngineEntry,
    Manifest,
    MeasuredError,
    Profile,
    TensorSpec,
    Verification,
    contract_io,
)
from lego_model.checkpoints import file_sha256
from lego_model.configs import get_config
from lego_model.errors import LegoError, ShapeError

from .conftest import onnx_declaring

PROFILE = Profile(batch=(1, 1, 8), height=(16, 16, 64), width=(16, 32, 64))
ONNX_BUILT = BuiltWith(torch="2.13.0", onnx="1.19.0", onnxruntime=None, python="3.11.7", exporter="dynamo", opset=18)
PLAN_BUILT = dataclasses.replace(
    ONNX_BUILT,
    tensorrt="10.9.0",
    gpu="NVIDIA H100 80GB HBM3",
    compute_capability="9.0",
    onnx_sha256="ab" * 32,
    engine_cache_key="cd" * 32,
)
VERIFIED = Verification.of(
    {"1x16x16": MeasuredError(2e-6, 1e-5), "2x16x32": MeasuredError(1e-6, 3e-5)}, 1e-4, "onnxruntime-cpu"
)


CONFIG = get_config("tiny_PG_16")
CHECKPOINT = CheckpointRecord.random_init(0)


def _entry(engine_dir: Path, name: str, fmt: str = "onnx", onnx_sha256: str | None = None) -> EngineEntry:
    """An entry of engine ``name`` of CONFIG and its file: a stand-in ONNX with the identity, or plan bytes."""
    file = f"{name}.{'onnx' if fmt == 'onnx' else 'plan'}"
    brick = None if name == "embedder" else int(name.removeprefix("brick"))
    kind = "embedder" if brick is None else "brick"
    inputs, outputs = contract_io(CONFIG, kind, brick)
    if fmt == "onnx":
        identity = engine_identity(name, kind, brick, "fp32", CONFIG, CHECKPOINT)
        payload = onnx_declaring(engine_dir / file, inputs, outputs, identity, producer=f"stand-in {name} AAAA")
    else:
        payload = b"plan %s" % name.encode()
        (engine_dir / file).write_bytes(payload)
    return EngineEntry(
        name=name,
        kind=kind,
        brick=brick,
        file=file,
        format=fmt,
        precision="fp32",
        inputs=inputs,
        outputs=outputs,
        profile=PROFILE,
        sha256=file_sha256(engine_dir / file),
        bytes=len(payload),
        built_with=dataclasses.replace(PLAN_BUILT, onnx_sha256=onnx_sha256) if fmt == "tensorrt" else ONNX_BUILT,
        verification=VERIFIED,
    )


@pytest.fixture
def engine_dir(tmp_path: Path) -> Path:
    d = tmp_path / "engines"
    d.mkdir()
    entries = [_entry(d, name) for name in ("embedder", "brick0", "brick1", "brick2")]
    entries.append(_entry(d, "brick1", fmt="tensorrt", onnx_sha256=entries[2].sha256))
    write_manifest(Manifest(config=CONFIG, checkpoint=CHECKPOINT, engines=entries), d)
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
    assert list(m.engines_for("tensorrt")) == ["brick1"]
    assert m.engines_for("onnx")["brick1"].profile == PROFILE
    assert m.engines_for("onnx")["brick1"].inputs[0].shape == ["B", 5, "H", "W"]
    assert [t.name for t in m.engines_for("onnx")["brick0"].inputs] == ["x_in", "cond"]
    assert Manifest.from_dict(json.loads(m.to_json())) == m
    assert m.engines_for("tensorrt")["brick1"].path(engine_dir).read_bytes() == b"plan brick1"
    # every record comes back as the dataclass it was written from
    assert m.checkpoint == CheckpointRecord.random_init(0)
    assert m.engines_for("onnx")["brick2"].built_with == ONNX_BUILT
    assert m.engines_for("tensorrt")["brick1"].built_with.gpu == PLAN_BUILT.gpu
    assert m.engines[0].verification == VERIFIED
    assert VERIFIED.max_abs == 2e-6 and VERIFIED.max_rel == 3e-5  # the worst of each over the shapes


def test_checkpoint_record_of_a_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"weights")
    record = CheckpointRecord.of_file(ckpt)
    assert record == CheckpointRecord(path=str(ckpt.resolve()), sha256=file_sha256(ckpt), random_init_seed=None)
    assert CheckpointRecord.from_dict(dataclasses.asdict(record), "checkpoint") == record


def test_tensor_spec_concrete() -> None:
    assert TensorSpec("x_in", "float32", ["B", 5, "H", "W"]).concrete(3, 16, 32) == (3, 5, 16, 32)


def test_engines_for_unknown_format(engine_dir: Path) -> None:
    with pytest.raises(ManifestError, match="unknown engine format"):
        load_manifest(engine_dir).engines_for("tflite")


def test_tampered_file(engine_dir: Path) -> None:
    path = engine_dir / "brick1.onnx"
    path.write_bytes(path.read_bytes().replace(b"AAAA", b"BBBB"))  # same size, other content
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


@pytest.mark.parametrize("version", [0, SCHEMA_VERSION + 1, "1", None])
def test_bad_schema_version(engine_dir: Path, version) -> None:
    _edit(engine_dir, lambda d: d.update(schema_version=version))
    _refused(engine_dir, "schema version", str(SCHEMA_VERSION), "re-run lego-export")


def test_old_schema_is_refused_with_one_line(engine_dir: Path) -> None:
    """A directory of schema 1 (free-form checkpoint, built_with and verification dicts) is not read at all."""

    def as_schema_1(d: dict) -> None:
        d["schema_version"] = 1
        for e in d["engines"]:
            e["built_with"] = {"torch": "2.13.0", "gpu_name": "X", "capability": [8, 6]}  # a spelling 1 tolerated
            e["verification"] = {}

    _edit(engine_dir, as_schema_1)
    message = _refused(engine_dir, "older lego-export", "schema version 1", "re-run lego-export --force")
    assert message.startswith(str(engine_dir / MANIFEST_NAME))


def test_corrupt_json(engine_dir: Path) -> None:
    path = engine_dir / MANIFEST_NAME
    path.write_text(path.read_text()[:-40])
    # lego-export --force cannot replace what an unreadable manifest covers (test_force_keeps_user_files), so the
    # fix is not it
    message = _refused(engine_dir, "not valid JSON", "remove the directory and run lego-export again")
    assert "re-run lego-export --force" not in message


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
        (lambda d: d.update(extra=1), "unknown field 'extra'"),
        (lambda d: d.pop("created"), "'created' is missing"),
        # checkpoint record: exact keys, types, and one of file or random init
        (lambda d: d["checkpoint"].pop("sha256"), "checkpoint: required field 'sha256' is missing"),
        (lambda d: d["checkpoint"].update(seed=0), "checkpoint: unknown field 'seed'"),
        (lambda d: d["checkpoint"].update(random_init_seed="0"), "'random_init_seed' should be int or null, got str"),
        (lambda d: d["checkpoint"].update(random_init_seed=True), "should be int or null, got bool"),
        (lambda d: d["checkpoint"].update(path="/m.safetensors"), "either path and sha256"),
        (lambda d: d.update(checkpoint=[]), "checkpoint: expected a JSON object"),
        # built_with record
        (lambda d: d["engines"][0]["built_with"].pop("opset"), "built_with: required field 'opset' is missing"),
        (lambda d: d["engines"][0]["built_with"].update(gpu_name="X"), "built_with: unknown field 'gpu_name'"),
        (lambda d: d["engines"][0]["built_with"].update(opset="18"), "'opset' should be int, got str"),
        (lambda d: d["engines"][0]["built_with"].update(tensorrt="10.9.0"), "an ONNX file has no 'tensorrt'"),
        (lambda d: d["engines"][4]["built_with"].update(gpu=None), "a TensorRT plan needs 'gpu'"),
        (lambda d: d["engines"][4]["built_with"].update(compute_capability="sm_90"), "'sm_90' is not MAJOR.MINOR"),
        (lambda d: d["engines"][4]["built_with"].update(compute_capability=[9, 0]), "should be str or null, got list"),
        # verification record
        (lambda d: d["engines"][1]["verification"].pop("tolerance"), "'tolerance' is missing"),
        (lambda d: d["engines"][1]["verification"].update(reference="eager"), "unknown field 'reference'"),
        (lambda d: d["engines"][1]["verification"].update(max_rel="1e-5"), "'max_rel' should be float, got str"),
        (lambda d: d["engines"][1]["verification"]["shapes"]["1x16x16"].pop("max_abs"), "shape 1x16x16"),
        (lambda d: d["engines"][1]["verification"].update(shapes=[]), "'shapes' should be dict"),
        (lambda d: d["engines"][1].pop("verification"), "'verification' is missing"),
        (lambda d: d["engines"][1].pop("brick"), "'brick' is missing"),
        (lambda d: d["engines"][1]["inputs"][0].update(layout="NCHW"), "unknown field 'layout'"),
        (lambda d: d["engines"][1]["profile"].update(channels=[3, 3, 3]), "unknown field 'channels'"),
        (lambda d: d["engines"][0].pop("sha256"), "'sha256' is missing"),
        (lambda d: d["engines"][0].update(sha256="xyz"), "64 lowercase hex"),
        (lambda d: d["engines"][0].update(format="tflite"), "format 'tflite'"),
        (lambda d: d["engines"][0].update(precision="int4"), "precision 'int4'"),
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


def test_integers_are_valid_floats(engine_dir: Path) -> None:
    _edit(engine_dir, lambda d: d["engines"][1]["verification"].update(max_abs=0))
    assert load_manifest(engine_dir).engines[1].verification.max_abs == 0.0


def test_write_manifest_refuses_invalid(tmp_path: Path) -> None:
    bad = Manifest(config=get_config("tiny_PG_16"), checkpoint=CheckpointRecord(None, None, None), engines=[])
    with pytest.raises(ManifestError, match="either path and sha256"):
        write_manifest(bad, tmp_path)
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_profile_check() -> None:
    PROFILE.check(8, 16, 64)
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
