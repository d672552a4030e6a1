"""Engine directories of fake TensorRT plans (tests/fakes/tensorrt.py) whose kernels run a tiny model's engines."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import torch

from lego_model import LegoModel
from tests.fakes.tensorrt import FakeTensorRT, plan_bytes

# Activation memory the fake plans declare: per engine different, so that the shared scratch must take the largest.
DEVICE_MEMORY = {"embedder": 1 << 12, "brick": 1 << 16}


def _kernel(model: LegoModel, kind: str, brick: int | None):
    if kind == "embedder":
        return lambda i: {"cond": model.embed(i["c_noise"], i.get("class_labels"))}
    return lambda i: {"f": model.bricks[brick](i["x_in"], i.get("f_prev"), i["cond"])}


def _upsample(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stand-in VAE decoder kernel: the first three latent channels, 8x nearest-neighbour."""
    return {"images": inputs["latents"][:, :3].repeat_interleave(8, 2).repeat_interleave(8, 3)}


def fake_tensorrt_dir(
    model: LegoModel, out: Path, trt: FakeTensorRT, *, batch=(1, 1, 8), side=None, checkpoint=None, decoder=False
) -> Path:
    """Write a fake plan per engine of ``model`` and a manifest of ``tensorrt`` entries into ``out``; register the
    plans' kernels (the model's own embedder and bricks) with ``trt``.  Built "here": the fake GPU and TensorRT.

    ``decoder`` (latent models): also a ``vae_decoder`` plan, whose kernel is :func:`_upsample`, with the
    manifest's VAE record."""
    from export.identity import engine_identity, plan_name
    from export.manifest import write_manifest
    from export.onnx_export import DEFAULT_OPSET
    from export.pipeline import onnx_built_with
    from export.records import (
        VAE_ENGINE,
        CheckpointRecord,
        EngineEntry,
        Manifest,
        Profile,
        VaeRecord,
        Verification,
        contract_io,
    )
    from export.specs import engine_specs, profile_shapes
    from export.verify import TOLERANCES
    from lego_model.checkpoints import file_sha256

    cfg = model.config
    record = checkpoint or CheckpointRecord.random_init(0)
    m, res = cfg.size_multiple, cfg.resolution
    side = side or (m, res, 4 * res)
    profile = Profile(batch=tuple(batch), height=tuple(side), width=tuple(side))
    gpu, major, minor = trt.cuda.properties(torch.device("cpu"))
    built_with = dataclasses.replace(
        onnx_built_with("torchscript", DEFAULT_OPSET), tensorrt=trt.version, gpu=gpu,
        compute_capability=f"{major}.{minor}", onnx_sha256="0" * 64, engine_cache_key="0" * 64,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for spec in engine_specs(cfg):
        identity = engine_identity(spec.name, spec.kind, spec.brick, "fp32", cfg, record)
        kernel = f"{cfg.name}.{spec.name}"
        trt.kernels[kernel] = _kernel(model, spec.kind, spec.brick)
        path = out / f"{spec.name}.plan"
        path.write_bytes(
            plan_bytes(
                plan_name(identity),
                [t.to_dict() for t in spec.inputs],
                [t.to_dict() for t in spec.outputs],
                profile_shapes(spec, profile),
                kernel=kernel,
                device_memory=DEVICE_MEMORY[spec.kind],
                built_on=gpu,
            )
        )
        entries.append(
            EngineEntry(
                name=spec.name,
                kind=spec.kind,
                brick=spec.brick,
                file=path.name,
                format="tensorrt",
                precision="fp32",
                inputs=spec.inputs,
                outputs=spec.outputs,
                profile=profile,
                sha256=file_sha256(path),
                bytes=path.stat().st_size,
                built_with=built_with,
                verification=Verification.of({}, TOLERANCES["fp32"], "unverified (fake plans)"),
            )
        )
    vae = None
    if decoder:
        vae = VaeRecord(source=str(out / "vae"), sha256="1" * 64, scaling_factor=0.18215, shift_factor=None,
                        latent_channels=cfg.img_channels, block_out_channels=(32, 64))  # fmt: skip
        inputs, outputs = contract_io(cfg, VAE_ENGINE)
        corners = [(profile.batch[i], profile.height[i], profile.width[i]) for i in range(3)]
        trt.kernels["vae"] = _upsample
        path = out / "vae_decoder.plan"
        identity = engine_identity(VAE_ENGINE, VAE_ENGINE, None, "fp32", cfg, vae.weights())
        path.write_bytes(
            plan_bytes(
                plan_name(identity),
                [t.to_dict() for t in inputs],
                [t.to_dict() for t in outputs],
                {"latents": tuple(inputs[0].concrete(*c) for c in corners)},
                kernel="vae",
                built_on=gpu,
            )
        )
        entries.append(
            EngineEntry(
                name=VAE_ENGINE,
                kind=VAE_ENGINE,
                brick=None,
                file=path.name,
                format="tensorrt",
                precision="fp32",
                inputs=inputs,
                outputs=outputs,
                profile=profile,
                sha256=file_sha256(path),
                bytes=path.stat().st_size,
                built_with=built_with,
                verification=Verification.of({}, TOLERANCES["fp32"], "unverified (fake plans)"),
            )
        )
    manifest = Manifest(
        config=cfg, checkpoint=record, engines=entries, vae=vae,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
    )  # fmt: skip
    write_manifest(manifest, out)
    return out
