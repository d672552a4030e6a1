"""ONNX files from the embedder and the bricks, with dynamic batch, height and width.

Exporter choice: the dynamo exporter (``torch.onnx.export(..., dynamo=True)``,
built on torch.export).  It traces with symbolic sizes, so every size that
reaches the graph is either a symbol or a constant on purpose: declaring
``H = r * nh`` and ``W = r * nw`` with independent ``nh`` and ``nw`` makes the
export fail loudly if anything in the brick pinned H, W or H == W, instead of
baking a traced integer into a Reshape as the TorchScript tracer can do without
notice (that would only show up at another shape).  The TorchScript exporter
(deprecated since torch 2.9) is the fallback for a torch whose dynamo exporter
cannot handle the graph; both keep B, H and W dynamic for this model, and the
verification at several shapes checks whichever one ran.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import onnx
import torch

from export.errors import ExportError
from export.specs import EngineSpec
from lego_model.model import LegoModel

log = logging.getLogger(__name__)

# LayerNormalization needs 17 and the dynamo exporter's Split(num_outputs) 18 (its down-conversion to 17
# leaves that attribute in place, and the checker refuses the file).  20 has Gelu(approximate="tanh") as one op,
# which the exporter writes for the MLP's tanh-GELU instead of nine elementwise nodes (Pow, Mul, Add, Tanh, ...):
# ONNX Runtime has no fusion for that decomposition and ran it node by node; OpenVINO fuses either form.
# TensorRT 10 parses opsets up to 20.
DEFAULT_OPSET = 20
EXPORTERS = ("dynamo", "torchscript")
_ONNX_ELEM = {
    "float32": onnx.TensorProto.FLOAT,
    "float16": onnx.TensorProto.FLOAT16,
    "bfloat16": onnx.TensorProto.BFLOAT16,
}


def onnx_from_spec(
    spec: EngineSpec,
    model: LegoModel,
    path: str | Path,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    identity: Mapping[str, str] | None = None,
) -> str:
    """Export one engine's forward to ``path``; returns the exporter that produced it.

    ``exporter="dynamo"`` falls back to TorchScript (with a warning in the
    log) when the dynamo exporter raises, but for an OSError (a full disk),
    which is the caller's one line; ``"torchscript"`` forces it.
    ``identity`` (:func:`export.identity.engine_identity`) is written as the
    file's metadata props; an engine directory's files need it (load_manifest
    refuses a file without), a file made for a structural test may go without.
    The file is checked (:func:`check_onnx`) before this returns.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    path = Path(path)
    module = spec.module(model, precision)
    # Sample sizes > 1 and H != W: torch.export specialises sizes 0 and 1 and would unify equal sizes.
    sample = spec.sample_inputs(model, batch=2, height=2 * spec.tile, width=3 * spec.tile)
    args = tuple(sample[name] for name in spec.input_names)
    used = exporter
    if exporter == "dynamo":
        try:
            _export_dynamo(module, args, spec, path, opset)
        except OSError:  # the file system's (a full disk): TorchScript would fail alike, and the error is one line
            raise
        except Exception as err:  # the dynamo exporter raises many unrelated types; all mean "try the other one"
            log.warning(
                "%s: dynamo exporter failed (%s: %s); falling back to TorchScript", spec.name, type(err).__name__, err
            )
            used = "torchscript"
    if used == "torchscript":
        _export_torchscript(module, args, spec, path, opset)
    _name_dims(path, spec, identity or {})
    check_onnx(path, spec)
    return used


def _export_dynamo(module: torch.nn.Module, args: tuple, spec: EngineSpec, path: Path, opset: int) -> None:
    with _quiet_exporter():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            dynamic_shapes=spec.dynamic_shapes(),
            input_names=spec.input_names,
            output_names=spec.output_names,
            opset_version=opset,
            optimize=True,  # onnxscript's optimizer: constant folding and dead-code removal
            external_data=False,
            verbose=False,
        )
    program.save(str(path))


def _export_torchscript(module: torch.nn.Module, args: tuple, spec: EngineSpec, path: Path, opset: int) -> None:
    with _quiet_exporter():
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
        )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' progress prints, deprecation warnings and optional-op notices."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnx_ir", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _name_dims(path: Path, spec: EngineSpec, identity: Mapping[str, str]) -> None:
    """Give the dynamic dims the contract's names (dynamo calls them e.g. ``8*nh``), drop debug metadata,
    and write the engine's identity as the model's metadata props.

    The dynamo exporter annotates every node with its Python stack trace, which
    holds absolute paths of this checkout: the same model exported from two
    clones would get two sha256 (and miss the TensorRT engine cache), and the
    annotations add ~100 KB per file.
    """
    model = onnx.load(str(path))
    rename: dict[str, str] = {}
    for value, tensor in zip(model.graph.input, spec.inputs):
        for dim, want in zip(value.type.tensor_type.shape.dim, tensor.shape):
            if isinstance(want, str) and dim.dim_param and dim.dim_param != want:
                rename[dim.dim_param] = want
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
    for value, tensor in zip(model.graph.output, spec.outputs):  # derived dims, e.g. the VAE decoder's "8*H"
        for dim, want in zip(value.type.tensor_type.shape.dim, tensor.shape):
            if isinstance(want, str) and dim.dim_param:
                dim.dim_param = want
    for graph in [model.graph, *(f for f in model.functions)]:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    del model.graph.metadata_props[:]
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, dict(identity))
    onnx.save(model, str(path))


def check_onnx(path: str | Path, spec: EngineSpec) -> None:
    """ONNX checker, strict shape inference, and the I/O names, dtypes and (symbolic) shapes of the contract."""
    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(
            f"{spec.name}: {path.name} fails the ONNX checker ({first}); this is an exporter bug"
        ) from None
    for kind, values, tensors in (
        ("input", model.graph.input, spec.inputs),
        ("output", model.graph.output, spec.outputs),
    ):
        got = [
            (v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in values
        ]
        want = [(t.name, _ONNX_ELEM[t.dtype], list(t.shape)) for t in tensors]
        if got != want:
            raise ExportError(f"{spec.name}: {path.name} has {kind}s {got}, the engine contract wants {want}")


def tensor_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named value of a shape-inferred model (inputs, outputs, initializers, value_info)."""
    types = {
        v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]
    }
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def op_input_dtypes(path: str | Path) -> dict[str, set[str]]:
    """Op type -> the set of dtypes its first input has anywhere in the graph (e.g. ``{"Softmax": {"float32"}}``).

    Used to report and test which ops of a half-precision file stay in fp32.
    """
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = tensor_dtypes(model)
    for node in model.graph.node:  # Constant nodes carry their type in the attribute
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.data_type:
            types[node.output[0]] = node.attribute[0].t.data_type
    names = {v: k for k, v in _ONNX_ELEM.items()}
    out: dict[str, set[str]] = {}
    for node in model.graph.node:
        if node.input and node.input[0] in types:
            out.setdefault(node.op_type, set()).add(
                names.get(types[node.input[0]], onnx.TensorProto.DataType.Name(types[node.input[0]]))
            )
    return out
