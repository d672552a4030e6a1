"""The eager sampling CLI."""

from __future__ import annotations

from click.testing import CliRunner
from PIL import Image

from lego_model.generate import main


def test_generate_writes_pngs_and_grid(tmp_path):
    out = tmp_path / "s"
    args = ["--config", "tiny_PG_16", "--random-init", "--seeds", "0-2", "--steps", "2", "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--height", "16", "--width", "32", "--skip-preset", "global@0.5"])
    assert result.exit_code == 0, result.output
    assert "relative cost" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png", "grid.png"]
    assert Image.open(out / "000001.png").size == (32, 16)


def test_generate_errors_are_one_line(tmp_path):
    runner = CliRunner()
    for args, message in [
        (["--config", "tiny_PG_16", "--random-init", "--height", "20"], "multiples of 16"),
        (["--config", "nope", "--random-init"], "unknown config 'nope'"),
        (["--config", "tiny_PG_16", "--random-init", "--skip", "7@0:1"], "brick 7 does not exist"),
        (["--checkpoint", str(tmp_path / "missing.safetensors")], "does not exist"),
    ]:
        result = runner.invoke(main, [*args, "--out", str(tmp_path / "o")])
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.output
