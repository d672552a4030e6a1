"""Exported ONNX files, chained as DESIGN.md describes, reproduce the authors' implementation (shared fixtures)."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

from export.manifest import load_manifest
from export.pipeline import ExportOptions, export_engine_dir
from export.records import CheckpointRecord, Profile
from lego_model.precond import denoise_with_bricks
from tests.conftest import FIXTURE_TENSORS, official_model

ATOL = 1e-4  # the same bound the eager model meets against these fixtures


@pytest.fixture(scope="module")
def official_pg(official, tmp_path_factory: pytest.TempPathFactory):
    """tiny_PG_16 with the fixture's weights, exported to ONNX; (model, embed, bricks) with ORT callables."""
    model = official_model(official, "tiny_PG_16")
    out = tmp_path_factory.mktemp("official") / "engines"
    profile = Profile(batch=(1, 2, 4), height=(16, 16, 32), width=(16, 16, 32))
    record = CheckpointRecord.of_file(FIXTURE_TENSORS)  # the weights came from the fixture file
    export_engine_dir(model, out, record, ExportOptions(profile=profile))
    engines = load_manifest(out).engines_for("onnx")
    sessions = {
        name: ort.InferenceSession(str(e.path(out)), providers=["CPUExecutionProvider"]) for name, e in engines.items()
    }

    def run(name: str, **inputs: torch.Tensor) -> torch.Tensor:
        feeds = {k: v.numpy() for k, v in inputs.items() if v is not None}
        return torch.from_numpy(sessions[name].run(None, feeds)[0])

    def embed(c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return run("embedder", c_noise=c_noise, class_labels=labels)

    def brick(k: int):
        return lambda x_in, f_prev, cond: run(f"brick{k}", x_in=x_in, f_prev=f_prev, cond=cond)

    return model, embed, [brick(k) for k in range(model.config.num_bricks)]


@pytest.mark.parametrize("case", [0, 1], ids=["train_size", "larger_canvas"])
def test_chained_onnx_matches_authors(official, official_pg, case: int) -> None:
    meta, t = official
    model, embed, bricks = official_pg
    key = meta["models"]["tiny_PG_16"]["cases"][case]["key"] + "/"
    x, sigma, labels = t[key + "x"], t[key + "sigma"], t[key + "class_labels"]

    def denoise(**kwargs: object) -> torch.Tensor:
        return denoise_with_bricks(embed, bricks, x, sigma, config=model.config, class_labels=labels, **kwargs)

    torch.testing.assert_close(denoise(), t[key + "D"], atol=ATOL, rtol=0)
    for k in range(model.config.num_bricks):  # early exit after brick k
        torch.testing.assert_close(denoise(active=tuple(range(k + 1))), t[key + f"D_stage{k}"], atol=ATOL, rtol=0)
    torch.testing.assert_close(denoise(cfg_scale=2.5), t[key + "D_cfg2.5"], atol=ATOL, rtol=0)
