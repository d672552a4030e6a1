"""int8 bricks: NNCF post-training quantization of the fp32 brick files into QDQ ONNX.

Library: NNCF (``nncf.quantize`` on an ONNX model, the ``int8`` extra), not ONNX
Runtime's ``quantize_static``.  Both write QDQ files (QuantizeLinear /
DequantizeLinear pairs around the quantized ops) from the same calibration
feeds; measured side by side (each with its default preset, one thread) on the
last brick of lego_S_PG_64 and of the shipped model (2-core AMD EPYC Zen 4,
AVX512-VNNI), NNCF's files were more accurate (relative L2 error against fp32
0.9 % vs 1.3 % on lego_S_PG_64, 4 % vs 7 % on the shipped model, the same
linears quantized) and faster: with the attention products quantized too (as
first exported), OpenVINO (bf16 for the rest) ran NNCF's lego_S_PG_64 brick
1.35x faster than the fp32 file in bf16 and ONNX Runtime's at 0.40x (OpenVINO
could not fuse the attention of ONNX Runtime's QDQ placement), and ONNX Runtime
ran NNCF's 1.77x faster than the fp32 file, its own 1.26x.  NNCF's transformer mode
(``ModelType.TRANSFORMER``) places the quantizers where OpenVINO's and ONNX
Runtime's int8 kernels pick them up, smooths activation outliers into the
weights (SmoothQuant, Xiao et al. 2023) and corrects the biases for the
rounding (fast bias correction).  The preset is PERFORMANCE: activations are
quantized symmetrically (zero point 0), which TensorRT's explicit quantization
requires of Q/DQ pairs; on the shipped model it samples as well as NNCF's
default (asymmetric activations): accuracy 89.0 % vs 88.5 %, Fréchet distance
13.0 vs 13.0, fp32 90.0 % and 12.4, 200 samples of 18 Heun steps.

What is quantized, per brick: the linears of the transformer blocks and the
head -- qkv, projection and MLP (weights per output channel, 8-bit symmetric;
activations per tensor).  What stays in float (and why, measured on the shipped model's
last brick against its fp32 file):

* the attention products (q k^T and softmax(...) v, MatMuls of two computed
  tensors; :func:`activation_products`): NNCF quantizes q k^T, and OpenVINO then
  converts q and k to fp32 blocked layouts for their FakeQuantize, reorders that
  cost more than the int8 product saves (2-core AMD EPYC Zen 4, OpenVINO 2026.4,
  bf16 for the rest, 2 threads, interleaved medians, with the blocks' earlier
  (B, L, T, D) layout): the shipped model's bricks at batch 16 ran 1.10-1.24x
  OpenVINO bf16 with attention in float, 0.87-1.11x with q k^T quantized;
  lego_S_PG_64's last brick at batch 1 1.24x vs 1.15x; the error against fp32
  was the same (relative L2 1.4 % either way on the shipped model's last brick).
  With the blocks' (B, N, D) layout as well (lego_model.model.Brick: OpenVINO
  fuses bias and GELU into 3-D int8 products only), a whole denoiser call ran
  1.21x (2 threads) and 1.31x (1 thread) OpenVINO bf16 on the shipped model at
  batch 16, 0.99x and 1.11x before both changes, and 1.38x on lego_S_PG_64 at
  batch 1 (2 threads).  Quantizing q k^T still loses with the (B, N, D) layout:
  a whole call of the shipped model at batch 16 (same machine, 2 threads,
  interleaved medians) ran 1.33x OpenVINO bf16 with attention in float and
  1.04x with q k^T quantized, for no gain in error (the bricks' verification
  errors 3.5-5.0e-2 vs 4.1-4.9e-2).  NNCF leaves softmax(...) v unquantized
  even when it is not ignored;

* the adaLN-modulation linears (``Gemm`` on cond): their outputs scale, shift
  and gate every token of a block, so their rounding multiplies into
  everything (relative L2 error 4 % -> 18 % with them quantized); they are
  [rows, D] x [D, 6D] products, a negligible share of the FLOPs;
* the patch embedding (:func:`patch_products`; a MatMul on patches since the
  fp32 files write it so, :class:`lego_model.forwards.PatchLinear`): as a
  quantized Conv, OpenVINO's output was wrong (relative L2 error 75 %, ONNX
  Runtime's 5 %); one small product per brick;
* the embedder (a separate engine, exported fp32): a few [B, 256] x [256, D]
  products whose output conditions every block of every brick.

SmoothQuant's per-channel multiplies mostly fuse into the quantizers after them; those before the
attention projections (on softmax(...) v) stay standalone nodes in OpenVINO.  They could be folded into the
value columns of the qkv weights, but bypassing them altogether (a speed bound, wrong numbers) ran a whole
call of the shipped model at batch 16 0.4 % faster (2-core AMD EPYC Zen 4, 2 threads, interleaved medians),
so the files keep NNCF's graph as it writes it.  OpenVINO's other int8 path, int8 weights only
(``nncf.compress_weights``, INT8_SYM) with its CPU plugin quantizing activations per token as it runs
(``DYNAMIC_QUANTIZATION_GROUP_SIZE``), ran that call at 0.85x (off), 0.95x (groups of 32) and 1.11x (groups of
128) OpenVINO bf16, where these static QDQ files ran 1.25-1.30x beside it: static quantization stays.

The quantizer is deterministic given its inputs, and the inputs are the
seeded trajectories of :mod:`export.calibration`, so two exports of one model
write identical files.  NNCF is imported lazily (only ``--precision int8``
needs it), with its usage telemetry declined (see :func:`import_nncf`), and its
progress bars (which it prints on stdout) go to the log instead.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from export.calibration import Feed
from export.errors import MissingDependencyError

log = logging.getLogger(__name__)

# Op types left in fp32 inside a brick (see the module docstring).
FP32_OPS = ("Gemm",)
# Op types an int8 file's summary counts as quantized: those with a DequantizeLinear on an input.
_COUNTED = ("MatMul", "Gemm", "Conv")


def import_nncf() -> Any:
    """The nncf module, or a MissingDependencyError naming the extra.

    NNCF sends usage telemetry (openvino_telemetry) unless told not to, and
    its telemetry object is created when nncf is first imported: the import
    runs with NNCF's own switch set (``NNCF_CI``) and the CI marker that
    openvino_telemetry honours, so nothing is sent and no client-id file is
    written; both variables are restored afterwards.
    """
    try:
        with _environment(NNCF_CI="1", CI="true"):
            import nncf
    except ImportError:
        raise MissingDependencyError(
            "--precision int8 quantizes with NNCF, which is not installed: pip install -e '.[int8]'"
        ) from None
    nncf.set_log_level(logging.ERROR)
    return nncf


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class Int8Summary:
    """What an int8 file computes in int8: per op type, how many nodes read int8 (dequantized) inputs, and how many
    stayed float."""

    quantized: dict[str, int]
    fp32: dict[str, int]

    def describe(self) -> str:
        """E.g. ``int8: 37 MatMul; fp32: 7 Gemm, 1 Conv``."""

        def counts(d: dict[str, int]) -> str:
            return ", ".join(f"{n} {op}" for op, n in sorted(d.items())) or "none"

        return f"int8: {counts(self.quantized)}; fp32: {counts(self.fp32)}"


def int8_summary(model: onnx.ModelProto) -> Int8Summary:
    """Which MatMul/Gemm/Conv nodes of a QDQ model read dequantized (int8) inputs and which stayed float."""
    dequantized = {out for n in model.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    quantized: collections.Counter[str] = collections.Counter()
    fp32: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        if node.op_type in _COUNTED:
            # An activation input (the first) read through a DequantizeLinear: the runtimes run the op in int8.
            (quantized if node.input[0] in dequantized else fp32)[node.op_type] += 1
    return Int8Summary(quantized=dict(quantized), fp32=dict(fp32))


def activation_products(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes of ``model`` that multiply two computed tensors (attention's q k^T and
    softmax(...) v), as opposed to a tensor by weights (an initializer or a Constant, possibly through a
    DequantizeLinear or Transpose of one)."""
    constant = {i.name for i in model.graph.initializer}
    constant |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for node in model.graph.node:  # weights reach a MatMul through these ops, in graph order
        if node.op_type in ("Transpose", "DequantizeLinear", "Cast", "Identity") and node.input[0] in constant:
            constant.update(node.output)
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in constant for i in n.input)]


def patch_products(model: onnx.ModelProto) -> list[str]:
    """Names of the products that read the brick's image inputs (``x_in``, ``f_prev``) before any other product:
    the patch embedding (a MatMul on patches, :class:`lego_model.forwards.PatchLinear`; a Conv in older files)."""
    reached = {i.name for i in model.graph.input if i.name in ("x_in", "f_prev")}
    found = []
    for node in model.graph.node:  # graph order is topological
        if any(i in reached for i in node.input):
            if node.op_type in _COUNTED:
                found.append(node.name)  # the products' outputs are not followed: later products read tokens
            elif node.op_type not in ("Shape", "Size"):  # a shape is not the image (reshapes of tokens read it)
                reached.update(node.output)
    return found


def _no_cast_to_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every no-op Cast that writes a graph output turned into an Identity.

    The TorchScript exporter writes the forwards' final ``.float()`` of a
    float32 tensor as such a Cast; NNCF 3.4's no-op-cast elimination then looks
    the output up among the graph's value_info, where outputs are not, and
    fails (KeyError).  An Identity computes the same and is left alone.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    outputs = {v.name for v in model.graph.output}
    for node in model.graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and node.output[0] in outputs and types.get(node.input[0]) == to:
            node.op_type = "Identity"
            del node.attribute[:]
    return model


def int8_from_onnx(src: str | Path, dst: str | Path, feeds: Sequence[Feed], identity: Mapping[str, str]) -> Int8Summary:
    """Quantize the fp32 brick file ``src`` into the QDQ file ``dst``, calibrated on ``feeds``.

    ``feeds`` are the brick's inputs along sampling trajectories
    (:func:`export.calibration.record_calibration`), all of them used;
    ``identity`` (:func:`export.manifest.engine_identity`, precision int8)
    replaces the fp32 file's metadata props.
    """
    if not feeds:
        raise ValueError("int8 quantization needs calibration feeds")
    nncf = import_nncf()
    model = _no_cast_to_outputs(onnx.load(str(src)))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # NNCF's rich progress bars
        quantized = nncf.quantize(
            model,
            nncf.Dataset(list(feeds)),
            model_type=nncf.ModelType.TRANSFORMER,
            preset=nncf.QuantizationPreset.PERFORMANCE,  # symmetric activations (see the module docstring)
            subset_size=len(feeds),
            ignored_scope=nncf.IgnoredScope(
                types=list(FP32_OPS), names=[*activation_products(model), *patch_products(model)]
            ),
        )
    if stdout.getvalue().strip():
        log.debug("nncf: %s", stdout.getvalue().strip())
    del quantized.metadata_props[:]
    onnx.helper.set_model_props(quantized, dict(identity))
    onnx.save(quantized, str(dst))
    return int8_summary(quantized)
