"""A fake ``tensorrt`` module (the TensorRT 10/11 Python API the project calls) that keeps TensorRT's rules.

Install it with ``monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(cuda, kernels).module())``.  Plans are
JSON (see :func:`plan_bytes`); an engine's work is a Python callable of the test (``kernels``), run on the
tensors behind the addresses a context was given, on the fake GPU of tests/fakes/cuda.py.  Raises
:class:`FakeTensorRTError` where the documented rules are broken:

* a context changed (``set_input_shape``, ``set_tensor_address``, its device memory) while a CUDA graph that
  captured it is alive -- the graph replays the kernels, addresses and shapes of its capture (TensorRT's
  developer guide: one execution context per captured graph; trtexec captures a graph per context);
* a context's first enqueue after a shape change inside a capture (trtexec: "avoid capturing
  initialization calls by executing the enqueue function at least once before starting CUDA graph capture");
* two contexts on one device memory (scratch) running at the same time (``IExecutionContext.device_memory``:
  "using it in another execution context running in parallel ... results in undefined behavior");
* ``execute_async_v3`` on the legacy default stream 0 (its docs: extra device synchronisation; use another);
* device memory smaller than the engine's ``device_memory_size_v2``, or none on a user-managed context.

The builder side (``Builder``, ``OnnxParser``, builder config, timing caches) keeps the timing cache rule: a cache
made on another device is refused by ``set_timing_cache(..., ignore_mismatch=False)`` (it returns False, and
``get_timing_cache()`` then returns None), as the API docs describe.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import json
import threading
import types
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tests.fakes.cuda import FakeCuda, FakeStream

PLAN_MAGIC = b"FAKEPLAN1\n"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TRT_NAMES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16"}

Kernel = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class FakeTensorRTError(AssertionError):
    """A documented TensorRT rule was broken (on a GPU: wrong results, a crash or a silent device sync)."""


@dataclass(frozen=True)
class _Member:
    """An enum member as the bindings expose them (``.name``, comparable)."""

    name: str
    value: int

    def __int__(self) -> int:
        return self.value


def _enum(name: str, *members: str) -> type:
    return type(name, (), {m: _Member(m, i) for i, m in enumerate(members)})


TensorIOMode = _enum("TensorIOMode", "NONE", "INPUT", "OUTPUT")
DataType = _enum("DataType", "FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16", "INT64")
ExecutionContextAllocationStrategy = _enum(
    "ExecutionContextAllocationStrategy", "STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED"
)
NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH", "STRONGLY_TYPED")
BuilderFlag = _enum("BuilderFlag", "FP16", "BF16", "INT8", "TF32", "REFIT")
MemoryPoolType = _enum("MemoryPoolType", "WORKSPACE", "DLA_MANAGED_SRAM")


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity: int = 2) -> None:
        self.min_severity = min_severity


def plan_bytes(
    name: str,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    profile: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
    *,
    kernel: str,
    device_memory: int = 1 << 16,
    built_on: str = "NVIDIA H200 (fake)",
) -> bytes:
    """A fake plan: I/O as {name, dtype, shape} with symbolic "B", "H", "W" dims, the profile's (min, opt, max)
    per input, the name of its kernel, its activation memory, the device it was built on."""
    header = {
        "name": name,
        "inputs": inputs,
        "outputs": outputs,
        "profile": {k: [list(s) for s in v] for k, v in profile.items()},
        "kernel": kernel,
        "device_memory": device_memory,
        "built_on": built_on,
    }
    return PLAN_MAGIC + json.dumps(header).encode()


def tensor_at(address: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The tensor of ``shape`` and ``dtype`` at a raw address of host memory (the fake GPU's memory)."""
    count = 1
    for d in shape:
        count *= d
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    buffer = (ctypes.c_byte * max(nbytes, 1)).from_address(address)
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)


class ICudaEngine:
    def __init__(self, trt: FakeTensorRT, header: dict[str, Any]) -> None:
        self._trt = trt
        self.name = header["name"]
        self._io = [(t, TensorIOMode.INPUT) for t in header["inputs"]] + [
            (t, TensorIOMode.OUTPUT) for t in header["outputs"]
        ]
        self.profile = {k: tuple(tuple(s) for s in v) for k, v in header["profile"].items()}
        self.kernel = header["kernel"]
        self.device_memory_size_v2 = int(header["device_memory"])
        self.device_memory_size = self.device_memory_size_v2
        self.num_io_tensors = len(self._io)
        self.contexts: list[IExecutionContext] = []

    def _spec(self, name: str) -> tuple[dict[str, Any], _Member]:
        for t, mode in self._io:
            if t["name"] == name:
                return t, mode
        raise KeyError(name)

    def get_tensor_name(self, i: int) -> str:
        return self._io[i][0]["name"]

    def get_tensor_mode(self, name: str) -> _Member:
        return self._spec(name)[1]

    def get_tensor_dtype(self, name: str) -> _Member:
        return getattr(DataType, _TRT_NAMES[self._spec(name)[0]["dtype"]])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in self._spec(name)[0]["shape"])

    def create_execution_context(self, strategy: _Member = ExecutionContextAllocationStrategy.STATIC):
        if not isinstance(strategy, _Member):
            raise TypeError("create_execution_context(strategy: ExecutionContextAllocationStrategy)")
        ctx = IExecutionContext(self, user_managed=strategy is ExecutionContextAllocationStrategy.USER_MANAGED)
        self.contexts.append(ctx)
        return ctx


class IExecutionContext:
    def __init__(self, engine: ICudaEngine, *, user_managed: bool) -> None:
        self.engine = engine
        self._trt = engine._trt
        self.user_managed = user_managed
        self._memory: tuple[int, int] | None = None if user_managed else self._trt.own_memory(engine)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self._graphs: list[weakref.ref] = []  # graphs that captured this context
        self._fresh = True  # no enqueue since the last shape change
        self.enqueues = 0

    # ---------------------------------------------------------------- settings: refused after a capture
    def _touch(self, what: str) -> None:
        live = [g for g in self._graphs if g() is not None]
        self._graphs = live
        if live:
            raise FakeTensorRTError(
                f"{what} on an execution context of {self.engine.kernel} that a live CUDA graph captured: the graph "
                "replays the addresses and shapes of its capture (use one context per captured graph)"
            )

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(int(d) for d in shape)
        self._touch(f"set_input_shape({name!r}, {shape})")
        spec, mode = self.engine._spec(name)
        if mode is not TensorIOMode.INPUT or len(shape) != len(spec["shape"]):
            return False
        lo, _, hi = self.engine.profile[name]
        if not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False  # outside the optimization profile
        if self._shapes.get(name) != shape:
            self._fresh = True
        self._shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self._touch(f"set_tensor_address({name!r})")
        self.engine._spec(name)
        self._addresses[name] = int(address)
        return True

    def set_device_memory(self, address: int, size: int) -> None:
        self._touch("set_device_memory")
        if size < self.engine.device_memory_size_v2:
            raise FakeTensorRTError(
                f"set_device_memory: {size} bytes for an engine that needs {self.engine.device_memory_size_v2}"
            )
        self._memory = (int(address), int(size))

    @property
    def device_memory(self) -> int | None:
        return None if self._memory is None else self._memory[0]

    @device_memory.setter
    def device_memory(self, address: int) -> None:
        self._touch("device_memory")
        self._memory = (int(address), self.engine.device_memory_size_v2)

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        spec, mode = self.engine._spec(name)
        if mode is TensorIOMode.INPUT:
            return self._shapes.get(name, self.engine.get_tensor_shape(name))
        return self._output_shape(spec)

    def _output_shape(self, spec: dict[str, Any]) -> tuple[int, ...]:
        sizes: dict[str, int] = {}
        for t, mode in self.engine._io:
            shape = self._shapes.get(t["name"])
            if mode is TensorIOMode.INPUT and shape is not None:
                for d, n in zip(t["shape"], shape):
                    if isinstance(d, str) and "*" not in d:
                        sizes[d] = n

        def size(d):
            if isinstance(d, int):
                return d
            factor, _, sym = d.rpartition("*")
            return int(factor or 1) * sizes.get(sym, -1) if sym in sizes else -1

        return tuple(size(d) for d in spec["shape"])

    # ---------------------------------------------------------------- enqueue
    def execute_async_v3(self, stream_handle: int) -> bool:
        trt, cuda = self._trt, self._trt.cuda
        if int(stream_handle) == 0:
            raise FakeTensorRTError(
                "execute_async_v3 on the legacy default stream 0: TensorRT then adds device synchronisations "
                "(use a non-default stream)"
            )
        stream = cuda.stream_of(stream_handle)
        inputs = [t for t, m in self.engine._io if m is TensorIOMode.INPUT]
        if any(t["name"] not in self._shapes for t in inputs) or any(
            t["name"] not in self._addresses for t, _ in self.engine._io
        ):
            return False  # shapes or addresses not all set
        if self._memory is None:
            return False  # a user-managed context without device memory
        graph = cuda.capture_graph()
        if graph is not None:
            if self._fresh:
                raise FakeTensorRTError(
                    f"first enqueue of {self.engine.kernel} after a shape change inside a CUDA graph capture "
                    "(enqueue once before capturing)"
                )
            self._graphs.append(weakref.ref(graph))
        snapshot = (
            {name: (self._addresses[name], self.get_tensor_shape(name)) for name in self._addresses},
            self._memory,
        )
        what = f"{self.engine.kernel} (context {id(self):#x})"
        cuda.enqueue(stream, lambda s, stamp: trt.run(self.engine, snapshot, s, stamp, what), what)
        self._fresh = False
        self.enqueues += 1
        return True


class Runtime:
    def __init__(self, trt: FakeTensorRT, logger: Logger) -> None:
        self._trt = trt
        self.logger = logger

    def deserialize_cuda_engine(self, plan: bytes) -> ICudaEngine | None:
        plan = bytes(plan)
        if not plan.startswith(PLAN_MAGIC):
            return None
        try:
            header = json.loads(plan[len(PLAN_MAGIC) :])
        except json.JSONDecodeError:
            return None
        return ICudaEngine(self._trt, header)


# -------------------------------------------------------------------------------------- the builder side
class ITimingCache:
    def __init__(self, device: str, entries: int = 0) -> None:
        self.device = device
        self.entries = entries

    def serialize(self) -> bytes:
        return json.dumps({"device": self.device, "entries": self.entries}).encode()


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, lo, opt, hi) -> None:
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class IBuilderConfig:
    def __init__(self, trt: FakeTensorRT) -> None:
        self._trt = trt
        self.flags = {BuilderFlag.TF32.name}
        self.pools: dict[str, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self._timing_cache: ITimingCache | None = None

    def clear_flag(self, flag: _Member) -> None:
        self.flags.discard(flag.name)

    def set_flag(self, flag: _Member) -> None:
        self.flags.add(flag.name)

    def set_memory_pool_limit(self, pool: _Member, size: int) -> None:
        self.pools[pool.name] = int(size)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized: bytes) -> ITimingCache:
        if not serialized:
            return ITimingCache(self._trt.device_name)
        record = json.loads(bytes(serialized))
        return ITimingCache(record["device"], record["entries"])

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if cache.device != self._trt.device_name and not ignore_mismatch:
            return False  # "a failure will be reported if the CUDA device property ... is different"
        self._timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._timing_cache


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.name = "Unnamed Network 0"
        self.inputs: list[dict[str, Any]] = []
        self.outputs: list[dict[str, Any]] = []


class OnnxParser:
    """Reads the ONNX file's graph inputs and outputs (their names, dtypes and symbolic dims) with onnx."""

    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        self.network = network
        self.errors: list[str] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]

    def parse_from_file(self, path: str) -> bool:
        import onnx

        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as err:
            self.errors.append(f"{type(err).__name__}: {err}")
            return False
        kinds = {1: "float32", 10: "float16", 16: "bfloat16"}

        def tensors(values):
            out = []
            for v in values:
                t = v.type.tensor_type
                dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
                out.append({"name": v.name, "dtype": kinds.get(t.elem_type, str(t.elem_type)), "shape": dims})
            return out

        self.network.inputs, self.network.outputs = tensors(model.graph.input), tensors(model.graph.output)
        self.network.onnx_path = path
        return True


class IHostMemory:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def __bytes__(self) -> bytes:
        return self._data

    @property
    def nbytes(self) -> int:
        return len(self._data)


class Builder:
    def __init__(self, trt: FakeTensorRT, logger: Logger) -> None:
        self._trt = trt

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig(self._trt)

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        trt = self._trt
        trt.builds += 1
        if config._timing_cache is not None:
            config._timing_cache.entries += 1
        (profile,) = config.profiles
        data = plan_bytes(
            network.name, network.inputs, network.outputs, profile.shapes,
            kernel=f"onnx:{Path(network.onnx_path).name}", built_on=trt.device_name,
            device_memory=1 << 16 if "WORKSPACE" not in config.pools else min(1 << 16, config.pools["WORKSPACE"]),
        )  # fmt: skip
        return IHostMemory(data)


# ------------------------------------------------------------------------------------------ the module
class FakeTensorRT:
    """One fake TensorRT installation on one fake GPU; :meth:`module` is what ``import tensorrt`` gives."""

    def __init__(
        self,
        cuda: FakeCuda,
        kernels: Mapping[str, Kernel] | None = None,
        *,
        version: str = "10.9.0.34",
        device_name: str | None = None,
    ) -> None:
        self.cuda = cuda
        self.kernels = dict(kernels or {})
        self.version = version
        self.device_name = device_name or cuda.name
        self.builds = 0
        self.runs = 0
        self._lock = threading.Lock()
        self._owned: list[torch.Tensor] = []

    def own_memory(self, engine: ICudaEngine) -> tuple[int, int]:
        """Device memory TensorRT allocates for a context of the default (static) strategy."""
        block = torch.empty(max(engine.device_memory_size_v2, 1), dtype=torch.uint8)
        self._owned.append(block)
        return block.data_ptr(), block.numel()

    def run(self, engine: ICudaEngine, snapshot, stream: FakeStream, stamp: dict[int, int], what: str) -> None:
        """An engine's work on the device: check its scratch is not in use elsewhere, run its kernel."""
        tensors, (memory, _) = snapshot
        self.cuda.access(("device memory", memory), stream, stamp, what)
        kernel = self.kernels.get(engine.kernel)
        if kernel is None:
            raise FakeTensorRTError(f"no kernel registered for {engine.kernel}")
        dtypes = {t["name"]: _DTYPES[t["dtype"]] for t, _ in engine._io}
        views = {name: tensor_at(address, shape, dtypes[name]) for name, (address, shape) in tensors.items()}
        inputs = {t["name"]: views[t["name"]] for t, m in engine._io if m is TensorIOMode.INPUT}
        with torch.no_grad():
            results = kernel(inputs)
            for t, m in engine._io:
                if m is TensorIOMode.OUTPUT:
                    views[t["name"]].copy_(results[t["name"]])
        with self._lock:
            self.runs += 1

    def module(self) -> types.ModuleType:
        """A module object with the names the project's code uses from ``tensorrt``."""
        trt = self
        mod = types.ModuleType("tensorrt")
        mod.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # importlib.util.find_spec looks at it
        mod.__version__ = self.version
        mod.Logger = Logger
        mod.Runtime = lambda logger: Runtime(trt, logger)
        mod.Builder = lambda logger: Builder(trt, logger)
        mod.OnnxParser = OnnxParser
        for enum in (TensorIOMode, DataType, ExecutionContextAllocationStrategy, NetworkDefinitionCreationFlag,
                     BuilderFlag, MemoryPoolType):  # fmt: skip
            setattr(mod, enum.__name__, enum)
        mod.ICudaEngine, mod.IExecutionContext = ICudaEngine, IExecutionContext
        return mod
