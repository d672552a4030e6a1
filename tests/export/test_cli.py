"""lego-export through click's CliRunner: exit codes, one-line errors, the summary, the missing-TensorRT refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from export import cli, tensorrt_build
from export.manifest import load_manifest
from export.records import CheckpointRecord
from lego_model import shipped
from lego_model.checkpoints import file_sha256, save_checkpoint
from lego_model.configs import get_config
from lego_model.errors import CheckpointError
from lego_model.model import LegoModel


def _invoke(*args: str):
    return CliRunner().invoke(cli.main, list(args), catch_exceptions=False)


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def shipped_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-free tiny checkpoint standing in for the shipped demo model."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny_pr.safetensors"
    save_checkpoint(LegoModel(get_config("tiny_PR_16")).randomize_(3), path)
    return path


def test_default_checkpoint_export_and_summary(
    shipped_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shipped, "shipped_checkpoint", lambda name="digits_pg": shipped_tiny)
    out = tmp_path / "engines"
    result = _invoke("--out", str(out), "--batch", "1:2:4", "--height", "16:16:32", "--width", "16:32:48")
    assert result.exit_code == 0, result.output
    assert "[4/4] brick2" in result.output  # progress per engine
    table = result.output[result.output.index("engine    format") :].splitlines()
    assert [line.split()[0] for line in table[2:6]] == ["embedder", "brick0", "brick1", "brick2"]
    assert all(" onnx " in line and " fp32 " in line and " MB " in line for line in table[2:6])
    manifest = load_manifest(out)
    assert manifest.config.name == "tiny_PR_16"
    assert manifest.checkpoint == CheckpointRecord(
        path=str(shipped_tiny.resolve()), sha256=file_sha256(shipped_tiny), random_init_seed=None
    )
    entry = manifest.engines_for("onnx")["embedder"]
    assert [t.name for t in entry.inputs] == ["c_noise"]
    assert entry.profile.batch == (1, 2, 4) and entry.profile.width == (16, 32, 48)
    # exporting again into the same directory needs --force
    again = _invoke("--out", str(out))
    assert "already exists; pass --force" in _one_line_error(again)


def test_no_shipped_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str = "digits_pg") -> Path:
        raise CheckpointError(f"no shipped model {name!r}")

    monkeypatch.setattr(shipped, "shipped_checkpoint", absent)
    line = _one_line_error(_invoke("--out", str(tmp_path / "e")))
    assert "--config NAME --random-init" in line
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("engines", ["trt", "all"])
def test_missing_tensorrt(engines: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensorrt_build, "missing_tensorrt_requirements", lambda: ["the tensorrt package"])
    result = _invoke("--config", "tiny_PG_16", "--random-init", "--engines", engines, "--out", str(tmp_path / "e"))
    line = _one_line_error(result)
    assert f"--engines {engines} needs TensorRT" in line and "pip install -e '.[gpu]'" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--config", "nope", "--random-init"], "unknown config 'nope'"),
        (["--checkpoint", "missing.safetensors"], "does not exist"),
        (["--config", "tiny_PG_16", "--random-init", "--height", "16:8:4"], "--height '16:8:4' must satisfy"),
        (["--config", "tiny_PG_16", "--random-init", "--batch", "1:8"], "--batch '1:8' must be MIN:OPT:MAX"),
        (["--config", "tiny_PG_16", "--random-init", "--width", "12:16:64"], "not multiples of 16"),
    ],
)
def test_one_line_errors(args: list[str], fragment: str, tmp_path: Path) -> None:
    line = _one_line_error(_invoke(*args, "--out", str(tmp_path / "e")))
    assert fragment in line
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--random-init"],
        ["--random-init", "--config", "tiny_PG_16", "--checkpoint", "x.safetensors"],
        ["--config", "tiny_PG_16"],
        ["--engines", "tflite"],
        ["--precision", "int4"],
        ["--opset", "17"],
    ],
)
def test_usage_errors(args: list[str]) -> None:
    assert _invoke(*args).exit_code == 2


def test_help_mentions_guidance_doubling() -> None:
    result = _invoke("--help")
    assert result.exit_code == 0
    assert "doubling the batch" in " ".join(result.output.split())


def test_random_init_record() -> None:
    model, record = cli._load_model(None, "tiny_PG_16", True, 5)
    assert record == CheckpointRecord.random_init(5)
    reference = LegoModel(get_config("tiny_PG_16")).randomize_(5)
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
