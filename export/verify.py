"""Export-time verification: every exported file against the eager module, one loop for every format.

:func:`verify_engine` runs an :class:`EngineRunner` (ONNX Runtime on the CPU
for ONNX files, :func:`export.tensorrt_build.plan_runner` on the GPU for
TensorRT plans) at each verification shape and compares with the eager model.

The error measure is ``max_rel = max |exported - eager| / max |eager|`` per
output (relative to the output's range, not per element: f crosses zero and
per-element ratios there mean nothing), next to the plain ``max_abs``.  The
reference is always the eager float32 model, so a half-precision file's error
includes its rounding; the tolerance depends on the precision.

ONNX Runtime's CPU provider has no bfloat16 kernels.  A bf16 file is checked
as an fp32 emulation: its bf16 weights and casts are widened to float32
(exactly, bf16 is a truncated float32) and the graph runs in fp32.  That checks
the graph, the dynamic shapes and the rounded weights, not bf16 arithmetic;
the TensorRT build verifies the real thing on the GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from export.errors import BackendError, VerificationError
from export.loaders import import_onnxruntime, session_from_onnx
from export.records import MeasuredError, Profile, Verification
from export.specs import EngineSpec
from lego_model.configs import LegoConfig
from lego_model.model import LegoModel

log = logging.getLogger(__name__)

# max |err| / max |eager| allowed per precision.  fp32: reassociation only; fp16: 10-bit mantissa through deep
# stacks; bf16: 7-bit mantissa of the weights, see the module docstring.  int8 keeps 256 levels of each activation
# tensor's range, fixed once over the whole noise schedule (static post-training quantization, export.quantize),
# where bf16 keeps 8 bits of every value: at moderate and high noise a brick's activations fill their ranges and the
# shipped model's bricks stay within 2-5 % of their output range; towards sigma_min = 0.002 the activations shrink
# to a small part of the ranges set at high noise (Q-Diffusion, Li et al. 2023: activation ranges drift along the
# timesteps), a few of the 8 bits are left, and a brick differs by up to ~50 % of its (small) output range there --
# in calls where c_out(sigma) ~ sigma = 0.2 % weighs it into D.  The verification's sigmas are drawn from EDM's
# training distribution, down to 0.002, so the bound is the low-noise figure; a wrong graph or weight differs by the
# whole range (>= 100 %).  What int8 costs in samples is measured, not bounded here (benchmarks/test_skipping.py,
# "quality per backend").
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2, "int8": 0.6}

Shape = tuple[int, int, int]  # (batch, height, width)


def verification_shapes(config: LegoConfig, profile: Profile) -> list[Shape]:
    """The shapes each file is checked at, all inside ``profile``.

    1. the profile's opt shape (usually batch 1 at the training size);
    2. a non-square shape with batch > 1 (width one size step away from height);
    3. a shape larger than training (2x each side, capped at the profile's max).

    Shapes the profile cannot hold (e.g. a single-size profile has no
    non-square shape) are left out; duplicates are dropped.
    """
    m, res = config.size_multiple, config.resolution
    b_lo, b_opt, b_hi = profile.batch
    _, h_opt, h_hi = profile.height
    w_lo, w_opt, w_hi = profile.width
    shapes: list[Shape] = [(b_opt, h_opt, w_opt)]
    batch2 = min(max(2, b_lo), b_hi)
    for w in (h_opt + m, h_opt - m, w_hi, w_lo):
        if w_lo <= w <= w_hi and w != h_opt:
            shapes.append((batch2, h_opt, w))
            break
    big_h, big_w = min(2 * res, h_hi), min(2 * res, w_hi)
    if big_h > res or big_w > res:
        shapes.append((b_lo, big_h, big_w))
    return list(dict.fromkeys(shapes))


def eager_output(spec: EngineSpec, model: LegoModel, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """The float32 eager result an engine must reproduce."""
    if spec.kind == "vae_decoder":  # the "model" is a lego_model.vae.Vae: diffusers' eager decoder
        return spec.reference(model, inputs)
    with torch.no_grad():
        if spec.kind == "embedder":
            out = model.embed(inputs["c_noise"], inputs.get("class_labels"))
        else:
            out = model.bricks[spec.brick](inputs["x_in"], inputs.get("f_prev"), inputs["cond"])
    return out.float().numpy()


def compare(out: np.ndarray, ref: np.ndarray) -> MeasuredError:
    """max_abs and max_rel (relative to max |ref|) of one output of the same shape as ``ref``."""
    err = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(err.max()) if err.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return MeasuredError(max_abs=max_abs, max_rel=max_abs / max(scale, 1e-12))


@dataclass(frozen=True)
class EngineRunner:
    """One exported file, ready to run: what the verification loop needs from a format.

    ``run`` takes the engine's named float32 CPU inputs and returns its one
    output as a float32 array; when the runtime cannot run them it raises
    :class:`VerificationError` with a one-line reason.
    """

    runtime: str  # recorded in the manifest: "onnxruntime-cpu", "tensorrt", ...
    run: Callable[[dict[str, torch.Tensor]], np.ndarray]


def verify_engine(
    spec: EngineSpec,
    model: LegoModel,
    runner: EngineRunner,
    precision: str,
    shapes: list[Shape],
    seed: int = 0,
) -> Verification:
    """Run ``runner`` at ``shapes`` on sample inputs and compare with the eager float32 model.

    Returns the manifest's ``verification`` record; raises :class:`VerificationError`
    naming the engine, the runtime, the shape and the error when the file cannot
    run there, returns another shape, or exceeds the precision's tolerance.
    """
    tolerance = TOLERANCES[precision]
    what = f"{spec.name} ({precision}, {runner.runtime})"
    results: dict[str, MeasuredError] = {}
    for i, (b, h, w) in enumerate(shapes):
        inputs = spec.sample_inputs(model, b, h, w, seed=seed + i)
        ref = eager_output(spec, model, inputs)
        try:
            out = runner.run(inputs)
        except VerificationError as err:
            raise VerificationError(f"{what} cannot run at batch {b}, {h}x{w}: {err}") from None
        if out.shape != ref.shape:
            raise VerificationError(
                f"{what} returns shape {list(out.shape)} at batch {b}, {h}x{w}, the eager model "
                f"{list(ref.shape)}; this is an exporter bug"
            )
        err = results[f"{b}x{h}x{w}"] = compare(out, ref)
        if not err.max_rel <= tolerance:  # also catches NaN
            raise VerificationError(
                f"{what} differs from the eager model at batch {b}, {h}x{w}: max |err| {err.max_abs:.3g} = "
                f"{err.max_rel:.3g} of the output range, tolerance {tolerance:g}"
            )
    return Verification.of(results, tolerance, runner.runtime)


def onnx_runner(spec: EngineSpec, path: str | Path, precision: str) -> EngineRunner:
    """ONNX Runtime on the CPU; a bf16 file runs as its fp32 emulation (see the module docstring).

    The session is the runtimes' (:func:`export.loaders.session_from_onnx`, default settings); a file it
    cannot load is a :class:`VerificationError`.
    """
    path = Path(path)
    emulate_bf16 = precision == "bf16"
    import_onnxruntime()  # a missing onnxruntime is not the file's fault: its own BackendError
    try:
        model = _widened(path) if emulate_bf16 else path
        session = session_from_onnx(model, name=path.name)
    except BackendError as err:
        raise VerificationError(str(err)) from None

    def run(inputs: dict[str, torch.Tensor]) -> np.ndarray:
        try:
            (out,) = session.run(spec.output_names, {k: v.numpy() for k, v in inputs.items()})
        except Exception as err:  # onnxruntime raises its own untyped errors (Fail, InvalidArgument, ...)
            raise VerificationError(_first_line(err)) from None
        return out

    return EngineRunner("onnxruntime-cpu" + ("-fp32-emulation" if emulate_bf16 else ""), run)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _widened(path: Path) -> bytes:
    """The serialized fp32 emulation of the bf16 ONNX file at ``path`` (:func:`widen_bf16`)."""
    try:
        model = onnx.load(str(path))
    except Exception as err:  # DecodeError of a file that is no ONNX protobuf, OSError, ...
        raise VerificationError(f"onnx cannot read {path.name} ({_first_line(err)})") from None
    return widen_bf16(model).SerializeToString()


def widen_bf16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every bfloat16 initializer, constant, cast and value widened to float32."""
    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    model = onnx.ModelProto.FromString(model.SerializeToString())

    def widen(t: onnx.TensorProto) -> None:
        if t.data_type != bf16:
            return
        if t.raw_data:
            bits = np.frombuffer(t.raw_data, dtype=np.uint16)
        else:
            bits = np.asarray(t.int32_data, dtype=np.uint32).astype(np.uint16)
        values = (bits.astype(np.uint32) << 16).view(np.float32).reshape(tuple(t.dims))
        t.CopyFrom(onnx.numpy_helper.from_array(values, t.name))

    for t in model.graph.initializer:
        widen(t)
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == bf16:
                attr.i = f32
            elif attr.type == onnx.AttributeProto.TENSOR:
                widen(attr.t)
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.tensor_type.elem_type == bf16:
            value.type.tensor_type.elem_type = f32
    return model
