"""Session fixtures of the benchmark suite: the report, the models and their exported engines."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmarks.harness import Report, format_table
from export.records import CheckpointRecord
from lego_model import LegoModel, get_config
from lego_model.checkpoints import load_checkpoint
from lego_model.errors import CheckpointError
from lego_model.shipped import shipped_checkpoint

log = logging.getLogger(__name__)

# Random-weight models of the authors' S size: one per stacking order.
RANDOM_MODELS = ["lego_S_PG_64", "lego_S_PR_64", "lego_S_U_64"]
SHIPPED = "shipped"
# LEGO_BENCH_MODELS=shipped,lego_S_PG_64 restricts a run to some models (all by default).
_ONLY = {m for m in os.environ.get("LEGO_BENCH_MODELS", "").split(",") if m}
_REPORT = Report()


@dataclass
class BenchModel:
    """A model under test, its sizes and (after export) its ONNX engine directory."""

    name: str
    model: LegoModel
    engine_dir: Path

    @property
    def config(self):
        return self.model.config

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Training size, a larger size and a non-square size, all legal for this model."""
        r, m = self.config.resolution, self.config.size_multiple
        wide = max(2 * r, r + m)
        return {"train": (r, r), "larger": (2 * r, 2 * r), "non-square": (r, wide)}


@pytest.fixture(scope="session")
def report() -> Report:
    return _REPORT


def _export(model: LegoModel, out: Path, checkpoint: CheckpointRecord) -> Path:
    import dataclasses

    from export.pipeline import ExportOptions, export_engine_dir
    from export.specs import default_profile

    # Batch up to 16: the speed grid samples the shipped model 16 images at a time.
    profile = dataclasses.replace(default_profile(model.config), batch=(1, 1, 16))
    options = ExportOptions(engines="onnx", precision="fp32", profile=profile)
    export_engine_dir(model, out, checkpoint, options, progress=log.info)
    return out


@pytest.fixture(scope="session")
def bench_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BenchModel]:
    """Every benchmarked model with an fp32 ONNX export: the shipped model and the S configs (random weights)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("engines")
    models: dict[str, BenchModel] = {}
    try:
        if _ONLY and SHIPPED not in _ONLY:
            raise CheckpointError("left out by LEGO_BENCH_MODELS")
        path = shipped_checkpoint()
        model = load_checkpoint(path)
        models[SHIPPED] = BenchModel(SHIPPED, model, _export(model, root / SHIPPED, CheckpointRecord.of_file(path)))
    except CheckpointError as err:
        _REPORT.notes.append(f"shipped model not benchmarked: {err}")
    for name in RANDOM_MODELS:
        if _ONLY and name not in _ONLY:
            continue
        model = LegoModel(get_config(name)).randomize_(0).eval()
        models[name] = BenchModel(name, model, _export(model, root / name, CheckpointRecord.random_init(0)))
    return models


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not config.getoption("--benchmark") or not _REPORT.tables:
        return
    for name, rows in _REPORT.tables.items():
        terminalreporter.write_sep("-", name)
        terminalreporter.write_line(format_table(rows))
    run_dir = _REPORT.save()
    terminalreporter.write_sep("-", f"results written to {run_dir} (and benchmarks/results/latest/)")
