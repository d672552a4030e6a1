"""Fixtures of the runtime tests: tiny random-weight models and their ONNX engine directories."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch

from lego_model import LegoModel, get_config

SEED = 0  # random-init seed of every tiny model here


def export_onnx_dir(model: LegoModel, out: Path, *, checkpoint=None, batch=(1, 1, 8), side=None) -> Path:
    """Write one ONNX file per engine and a manifest for ``model`` into ``out`` (the engine contract).

    Uses export's own functions (engine specs, onnx_from_spec, manifest
    writer) without the verification pass of lego-export, to keep the tests fast
    (and to let a test export a model whose outputs are broken on purpose): the
    verification records say so.  ``checkpoint`` defaults to random init seed SEED.
    """
    from export.identity import engine_identity
    from export.manifest import write_manifest
    from export.onnx_export import DEFAULT_OPSET, onnx_from_spec
    from export.pipeline import onnx_built_with
    from export.records import CheckpointRecord, EngineEntry, Manifest, Profile, Verification
    from export.specs import engine_specs
    from export.verify import TOLERANCES
    from lego_model.checkpoints import file_sha256

    cfg = model.config
    record = checkpoint or CheckpointRecord.random_init(SEED)
    m, res = cfg.size_multiple, cfg.resolution
    side = side or (m, res, 4 * res)
    profile = Profile(batch=tuple(batch), height=tuple(side), width=tuple(side))
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for spec in engine_specs(cfg):
        path = out / f"{spec.name}.onnx"
        # TorchScript: a second per tiny engine, where the dynamo exporter takes several.
        identity = engine_identity(spec.name, spec.kind, spec.brick, "fp32", cfg, record)
        onnx_from_spec(spec, model, path, "fp32", exporter="torchscript", identity=identity)
        entries.append(
            EngineEntry(
                name=spec.name,
                kind=spec.kind,
                brick=spec.brick,
                file=path.name,
                format="onnx",
                precision="fp32",
                inputs=spec.inputs,
                outputs=spec.outputs,
                profile=profile,
                sha256=file_sha256(path),
                bytes=path.stat().st_size,
                built_with=onnx_built_with("torchscript", DEFAULT_OPSET),
                verification=Verification.of({}, TOLERANCES["fp32"], "unverified (test fixture)"),
            )
        )
    manifest = Manifest(
        config=cfg,
        checkpoint=record,
        engines=entries,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
    )
    write_manifest(manifest, out)
    return out


def tiny_model(name: str) -> LegoModel:
    return LegoModel(get_config(name)).randomize_(SEED).eval()


@pytest.fixture(scope="session")
def engines_pg(tmp_path_factory) -> Path:
    """ONNX engine directory of tiny_PG_16 (class-conditional, 3 bricks), random init seed 0."""
    return export_onnx_dir(tiny_model("tiny_PG_16"), tmp_path_factory.mktemp("engines_pg"))


@pytest.fixture(scope="session")
def engines_pr(tmp_path_factory) -> Path:
    """ONNX engine directory of tiny_PR_16 (unconditional, 3 bricks), random init seed 0."""
    return export_onnx_dir(tiny_model("tiny_PR_16"), tmp_path_factory.mktemp("engines_pr"))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run the runtime tests with one torch thread, restoring the setting afterwards.

    Tiny models gain nothing from intra-op threads, and on a shared, loaded CPU
    OpenMP's spinning threads made a 10 ms eager call take seconds.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
