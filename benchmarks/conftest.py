"""Session fixtures of the benchmark suite: the report, the models and their exported engines."""

from __future__ import annotations

import importlib.util
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
# Models also exported as int8 (issue 20's targets): each costs a calibration run and NNCF's passes per brick.
INT8_MODELS = (SHIPPED, "lego_S_PG_64")
# LEGO_BENCH_MODELS=shipped,lego_S_PG_64 restricts a run to some models (all by default).
_ONLY = {m for m in os.environ.get("LEGO_BENCH_MODELS", "").split(",") if m}
_REPORT = Report()


@dataclass
class BenchModel:
    """A model under test, its sizes and (after export) its ONNX engine directory."""

    name: str
    model: LegoModel
    engine_dir: Path  # fp32 ONNX files
    int8_dir: Path | None = None  # lego-export --precision int8 of the same model (INT8_MODELS, with nncf)

    @property
    def config(self):
        return self.model.config

    def engines(self, precision: str) -> Path:
        """The engine directory whose files a run at ``precision`` needs: the int8 export for int8, else fp32."""
        if precision != "int8":
            return self.engine_dir
        if self.int8_dir is None:
            pytest.skip(f"{self.name} has no int8 export (models {', '.join(INT8_MODELS)}, with the int8 extra)")
        return self.int8_dir

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Training size, a larger size and a non-square size, all legal for this model."""
        r, m = self.config.resolution, self.config.size_multiple
        wide = max(2 * r, r + m)
        return {"train": (r, r), "larger": (2 * r, 2 * r), "non-square": (r, wide)}


@pytest.fixture(scope="session")
def report() -> Report:
    return _REPORT


@pytest.fixture(scope="session", autouse=True)
def fp32_means_fp32():
    """On CUDA, TF32 off for matmuls and cuDNN convolutions during the benchmarks.

    TF32 keeps 10 mantissa bits: the patch embedding alone moves a brick's
    output by ~2e-4 relative, above the fp32 parity tolerance; the fp32 rows
    (eager included) are then true fp32, and bf16 is its own precision.
    """
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if torch.cuda.is_available():
        _REPORT.notes.append("CUDA: TF32 off (matmuls and cuDNN convolutions); fp32 rows are fp32")
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _export(model: LegoModel, out: Path, checkpoint: CheckpointRecord, precision: str = "fp32") -> Path:
    import dataclasses

    from export.pipeline import ExportOptions, export_engine_dir
    from export.specs import default_profile

    # Batch up to 16: the speed grid samples the shipped model 16 images at a time.
    profile = dataclasses.replace(default_profile(model.config), batch=(1, 1, 16))
    options = ExportOptions(engines="onnx", precision=precision, profile=profile)
    export_engine_dir(model, out, checkpoint, options, progress=log.info)
    return out


def _with_int8(bm: BenchModel, root: Path, checkpoint: CheckpointRecord) -> BenchModel:
    """``bm`` with its int8 export where it is one of INT8_MODELS and NNCF is installed."""
    if bm.name not in INT8_MODELS:
        return bm
    if importlib.util.find_spec("nncf") is None:
        _REPORT.notes.append(f"{bm.name}: no int8 rows, NNCF is not installed (pip install -e '.[int8]')")
        return bm
    bm.int8_dir = _export(bm.model, root / f"{bm.name}-int8", checkpoint, precision="int8")
    return bm


@pytest.fixture(scope="session")
def bench_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BenchModel]:
    """Every benchmarked model with an fp32 ONNX export (and INT8_MODELS an int8 one): the shipped model and the
    S configs (random weights)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("engines")
    models: dict[str, BenchModel] = {}
    try:
        if _ONLY and SHIPPED not in _ONLY:
            raise CheckpointError("left out by LEGO_BENCH_MODELS")
        path = shipped_checkpoint()
        model = load_checkpoint(path)
        record = CheckpointRecord.of_file(path)
        models[SHIPPED] = _with_int8(BenchModel(SHIPPED, model, _export(model, root / SHIPPED, record)), root, record)
    except CheckpointError as err:
        _REPORT.notes.append(f"shipped model not benchmarked: {err}")
    for name in RANDOM_MODELS:
        if _ONLY and name not in _ONLY:
            continue
        model = LegoModel(get_config(name)).randomize_(0).eval()
        record = CheckpointRecord.random_init(0)
        models[name] = _with_int8(BenchModel(name, model, _export(model, root / name, record)), root, record)
    return models


def pytest_runtest_logfinish(nodeid: str, location) -> None:
    """With LEGO_BENCH_OUT, rewrite the results after every test: a run stopped by a timeout keeps what finished."""
    from benchmarks.harness import FLAT_OUT

    if FLAT_OUT is not None and _REPORT.tables:
        _REPORT.save()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not config.getoption("--benchmark") or not _REPORT.tables:
        return
    for name, rows in _REPORT.tables.items():
        terminalreporter.write_sep("-", name)
        terminalreporter.write_line(format_table(rows))
    run_dir = _REPORT.save()
    terminalreporter.write_sep("-", f"results written to {run_dir}")
