"""What an ONNX file declares (metadata props, graph inputs and outputs), read from the protobuf wire format.

Only the small messages are parsed; every other field (the weights above all)
is stepped over by its length without being copied, so checking a 1 GB brick
costs a few thousand field headers, not a parse of the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from export.errors import REEXPORT, ManifestError
from export.records import FileTensor

__all__ = ["onnx_declaration"]

# ONNX TensorProto element types of the engine I/O dtypes (TensorProto.FLOAT, FLOAT16, BFLOAT16).
_ONNX_DTYPE_NAMES = {1: "float32", 10: "float16", 16: "bfloat16"}


def onnx_declaration(content: Any, where: str) -> tuple[dict[str, str], list[FileTensor], list[FileTensor]]:
    """(metadata props, inputs, outputs) an ONNX file declares, read from its bytes (any buffer, e.g. an mmap).

    Only the small messages are parsed: the ModelProto's metadata props and the
    graph's inputs and outputs are cut out of the protobuf wire format, every
    other field (the weights above all) is stepped over by its length without
    being copied, so a 1 GB brick costs a few thousand field headers.
    """
    import onnx  # here, not at the top: reading a manifest of TensorRT plans needs no onnx
    from google.protobuf.message import DecodeError

    props: dict[str, str] = {}
    values: dict[int, list[Any]] = {_GRAPH_INPUT: [], _GRAPH_OUTPUT: []}
    initializers: set[str] = set()  # IR < 4 lists weights among the inputs
    problem = None
    # Views released on the way out, error or not: the caller's mmap can only close without live exports.
    with memoryview(content) as view, view.cast("B") as buf:
        try:
            for number, a, b in _fields(buf, 0, len(buf)):
                if number == _MODEL_METADATA_PROPS:
                    entry = onnx.StringStringEntryProto.FromString(bytes(buf[a:b]))
                    props[entry.key] = entry.value
                elif number == _MODEL_GRAPH:
                    for field_number, c, d in _fields(buf, a, b):
                        if field_number in values:
                            values[field_number].append(onnx.ValueInfoProto.FromString(bytes(buf[c:d])))
                        elif field_number == _GRAPH_INITIALIZER:
                            names = (bytes(buf[e:f]).decode() for n, e, f in _fields(buf, c, d) if n == _TENSOR_NAME)
                            initializers.update(names)
        except (DecodeError, ValueError, RuntimeError) as err:  # UnicodeDecodeError is a ValueError
            problem = str(err)
    if problem is not None:
        raise ManifestError(f"{where} is not an ONNX file ({problem}); {REEXPORT}")

    def tensors(declared: list[Any]) -> list[FileTensor]:
        out = []
        for v in declared:
            if v.name in initializers:
                continue
            if v.type.WhichOneof("value") != "tensor_type":
                out.append(FileTensor(v.name, "non-tensor", ()))
                continue
            elem = v.type.tensor_type.elem_type
            try:
                dtype = _ONNX_DTYPE_NAMES.get(elem) or onnx.TensorProto.DataType.Name(elem).lower()
            except ValueError:
                dtype = f"onnx type {elem}"
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in v.type.tensor_type.shape.dim
            )
            out.append(FileTensor(v.name, dtype, dims))
        return out

    return props, tensors(values[_GRAPH_INPUT]), tensors(values[_GRAPH_OUTPUT])


# Field numbers of onnx.proto (ModelProto.graph, .metadata_props; GraphProto.initializer, .input, .output;
# TensorProto.name): stable since ONNX 1.0.
_MODEL_GRAPH, _MODEL_METADATA_PROPS = 7, 14
_GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 5, 11, 12
_TENSOR_NAME = 8


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the protobuf message in ``buf[start:end]``.

    Fields of the other wire types (varints, fixed 32/64) are stepped over.
    """
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
            continue
        if wire == 2:
            length, pos = _varint(buf, pos, end)
            stop = pos + length
        elif wire in (1, 5):
            stop = pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unknown protobuf wire type {wire} at byte {pos}")
        if stop > end:
            raise ValueError(f"field {number} runs past the end of its message (truncated file?)")
        if wire == 2:
            yield number, pos, stop
        pos = stop


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError(f"malformed protobuf varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
