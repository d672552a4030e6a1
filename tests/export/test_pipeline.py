"""The engine directory as a whole: refusals before any work, atomic replacement, failure leaves the old one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from export import pipeline
from export.errors import ExportError, MissingDependencyError, ProfileError, VerificationError
from export.manifest import MANIFEST_NAME, load_manifest
from export.pipeline import ExportOptions, ExportResult, export_engine_dir, staged_directory
from export.records import Profile
from lego_model.model import LegoModel

from .conftest import RANDOM_INIT


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def old_dir(fp32_export: ExportResult, tmp_path: Path) -> Path:
    """A copy of a real engine directory, to be (not) replaced."""
    out = tmp_path / "engines"
    shutil.copytree(fp32_export.out, out)
    return out


@pytest.mark.parametrize("failure", [VerificationError("brick0 is off"), KeyboardInterrupt()])
def test_failure_mid_export_leaves_old_directory(
    old_dir: Path, tiny_model: LegoModel, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    before = _snapshot(old_dir)
    real_verify = pipeline.verify_engine
    calls: list[str] = []

    def verify_then_fail(spec, *args, **kwargs):
        calls.append(spec.name)
        if spec.name == "brick0":  # after the embedder was written into the staging directory
            raise failure
        return real_verify(spec, *args, **kwargs)

    monkeypatch.setattr(pipeline, "verify_engine", verify_then_fail)
    with pytest.raises(type(failure)):
        export_engine_dir(tiny_model, old_dir, RANDOM_INIT, ExportOptions(force=True))
    assert calls == ["embedder", "brick0"]
    assert _snapshot(old_dir) == before
    assert _leftovers(old_dir.parent) == []
    load_manifest(old_dir)


def test_existing_target_without_force_is_refused_before_work(
    old_dir: Path, tiny_model: LegoModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "onnx_from_spec", lambda *a, **k: pytest.fail("exported despite the refusal"))
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_engine_dir(tiny_model, old_dir, RANDOM_INIT, ExportOptions())


def test_force_refuses_a_directory_that_is_not_an_engine_directory(tmp_path: Path, tiny_model: LegoModel) -> None:
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(ExportError, match="not an engine directory"):
        export_engine_dir(tiny_model, precious, RANDOM_INIT, ExportOptions(force=True))
    assert (precious / "cat.jpg").read_bytes() == b"meow"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        export_engine_dir(tiny_model, tmp_path / "file", RANDOM_INIT, ExportOptions(force=True))


def test_staged_directory_replaces_atomically(old_dir: Path) -> None:
    with staged_directory(old_dir, force=True) as staging:
        assert staging.parent == old_dir.parent and staging != old_dir
        assert (old_dir / MANIFEST_NAME).is_file()  # the old directory is untouched while building
        (staging / "new.txt").write_text("new")
    assert _snapshot(old_dir) == {"new.txt": b"new"}
    assert _leftovers(old_dir.parent) == []


def test_staged_directory_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "engines"
    with staged_directory(target, force=False) as staging:
        (staging / "x").write_text("x")
    assert (target / "x").read_text() == "x"
    assert oct(target.stat().st_mode & 0o777) == oct(0o755)


def test_trt_without_tensorrt_refuses_before_anything(
    tmp_path: Path, tiny_model: LegoModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from export import tensorrt_build

    monkeypatch.setattr(tensorrt_build, "missing_tensorrt_requirements", lambda: ["the tensorrt package"])
    monkeypatch.setattr(pipeline, "onnx_from_spec", lambda *a, **k: pytest.fail("exported despite the refusal"))
    for engines in ("trt", "all"):
        with pytest.raises(MissingDependencyError, match=r"--engines .* pip install -e '\.\[gpu\]'"):
            export_engine_dir(tiny_model, tmp_path / "engines", RANDOM_INIT, ExportOptions(engines=engines))
    assert list(tmp_path.iterdir()) == []


def test_profile_with_illegal_sides_is_refused(tmp_path: Path, tiny_model: LegoModel) -> None:
    profile = Profile(batch=(1, 1, 2), height=(8, 16, 16), width=(16, 16, 16))
    with pytest.raises(ProfileError, match="multiples of 16"):
        export_engine_dir(tiny_model, tmp_path / "e", RANDOM_INIT, ExportOptions(profile=profile))
    assert list(tmp_path.iterdir()) == []


def test_half_precision_model_is_refused(tmp_path: Path, tiny_model: LegoModel) -> None:
    import copy

    with pytest.raises(ExportError, match="float32 model"):
        export_engine_dir(copy.deepcopy(tiny_model).half(), tmp_path / "e", RANDOM_INIT, ExportOptions())
    assert list(tmp_path.iterdir()) == []
