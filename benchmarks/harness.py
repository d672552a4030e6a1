"""Measurement helpers for the benchmark suite: clocks, peak memory, FLOPs, machine peak, reports.

Timing follows gpt-fast/nanoGPT practice: warm-up runs excluded, medians of
repeats, CUDA synchronised before a clock is read.  Ratios are only formed
between figures of the same run.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lego_model.files import write_atomic

# LEGO_BENCH_RESULTS redirects the results (a timestamped directory per run, mirrored to latest/);
# LEGO_BENCH_OUT writes them flat into one directory instead, rewritten as each test ends (benchmarks/gpu.sh).
RESULTS_DIR = Path(os.environ.get("LEGO_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))
FLAT_OUT = Path(os.environ["LEGO_BENCH_OUT"]) if os.environ.get("LEGO_BENCH_OUT") else None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 7, min_seconds: float = 0.0) -> dict[str, float]:
    """Median and minimum wall time of ``fn`` in ms, after ``warmup`` unmeasured calls."""
    for _ in range(warmup):
        fn()
    _sync()
    samples: list[float] = []
    start_all = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start_all < min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "repeats": len(samples)}


def interleaved_ms(
    fns: Mapping[str, Callable[[], Any]],
    *,
    min_rounds: int,
    max_rounds: int,
    budget_s: float,
    calls_per_turn: int = 1,
) -> dict[str, list[float]]:
    """Wall times in ms of each of ``fns``, one turn of each per round, rounds alternately forwards and backwards.

    On a shared machine the load changes within seconds: calls timed next to
    each other in one round see the same load, so ratios are best formed per
    round (:func:`paired`), and the alternation puts each fn as often before
    its neighbour as after it.  Rounds go on until ``budget_s`` has passed,
    at least ``min_rounds`` and at most ``max_rounds``: cheap calls get many
    rounds, expensive ones the minimum.  No warm-up: the caller's.

    A turn is ``calls_per_turn`` calls back to back; with more than one, the
    first is a lead-in and the sample is the mean of the others.  A sampling
    loop calls one engine back to back, while the first call after another
    backend's refills the caches that call evicted: on the 2-core AMD Zen 4,
    the shipped model at batch 16, the first of 8 calls in a turn took 4 %
    (OpenVINO int8) and 2 % (OpenVINO bf16) longer than the rest on a quiet
    machine, nothing measurable under load.  Small (the int8 target read
    1.25x in turns of 3, 1.26x call by call, 17 minutes apart), but cheap
    calls are timed as a loop makes them.
    """
    if min_rounds < 1 or max_rounds < min_rounds:
        raise ValueError(f"need 1 <= min_rounds <= max_rounds, got {min_rounds} and {max_rounds}")
    if calls_per_turn < 1:
        raise ValueError(f"need calls_per_turn >= 1, got {calls_per_turn}")
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    lead_in = 1 if calls_per_turn > 1 else 0
    start = time.perf_counter()
    for r in range(max_rounds):
        if r >= min_rounds and time.perf_counter() - start >= budget_s:
            break
        for n in names if r % 2 == 0 else reversed(names):
            for _ in range(lead_in):
                fns[n]()
            _sync()
            t0 = time.perf_counter()
            for _ in range(calls_per_turn - lead_in):
                fns[n]()
            _sync()
            samples[n].append((time.perf_counter() - t0) * 1e3 / (calls_per_turn - lead_in))
    return samples


def paired(reference: list[float], other: list[float]) -> list[float]:
    """Per-round ratios ``reference[i] / other[i]`` of two :func:`interleaved_ms` series (the speedup of other)."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"paired series need equal, non-zero lengths, got {len(reference)} and {len(other)}")
    return [a / b for a, b in zip(reference, other)]


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile (both the value itself for a single value)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


class PeakMemory:
    """Peak resident memory (and peak CUDA memory) of this process inside a ``with`` block, in MiB.

    Linux resets the VmHWM high-water mark when 5 is written to
    /proc/self/clear_refs, so phases of one process can be measured apart.
    """

    def __enter__(self) -> PeakMemory:
        self.reset_ok = _clear_refs()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.rss_mib = float("nan")
        self.cuda_mib = float("nan")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.rss_mib = _status_kib("VmHWM") / 1024 if self.reset_ok else float("nan")
        if torch.cuda.is_available():
            self.cuda_mib = torch.cuda.max_memory_allocated() / 2**20


def _clear_refs() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def current_rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn``, counted by torch's FlopCounterMode (matmuls, convolutions, attention)."""
    from torch.utils import flop_counter

    # torch counts the CUDA attention kernels but not the CPU one that SDPA dispatches to here;
    # it computes the same two matmuls, so it gets the same formula.
    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if cpu_sdpa not in flop_counter.flop_registry:

        def cpu_sdpa_flop(q_shape, k_shape, v_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            return flop_counter.sdpa_flop_count(q_shape, k_shape, v_shape)

        flop_counter.register_flop_formula(cpu_sdpa)(cpu_sdpa_flop)
    with flop_counter.FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def matmul_peak_gflops(
    dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096), seconds: float = 1.0, threads: int | None = None
) -> float:
    """This machine's measured matrix-multiply rate, in GFLOP/s: the best of square products of a few sizes.

    On the CPU the best of torch and the CPU libraries the backends use: ONNX
    Runtime's MLAS for fp32 (faster than torch's kernels on some CPUs) and
    OpenVINO for fp32 and bf16 (its oneDNN AMX kernels), so that an engine is
    compared with the fastest matmul of its own precision here.  ``torch.int8``
    is the rate of the int8 engines' own kernels (:func:`int8_matmul_peak_gflops`).  ``threads``: on the
    CPU, that many threads in every library (None: each library's default, all cores).
    """
    if dtype == torch.int8:
        return int8_matmul_peak_gflops(sizes, seconds, threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    best = 0.0
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        for n in sizes:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            stats = time_ms(lambda a=a, b=b: a @ b, warmup=2, repeats=3, min_seconds=seconds)
            best = max(best, 2 * n**3 / (stats["min_ms"] * 1e-3) / 1e9)
    finally:
        torch.set_num_threads(before)
    if device == "cpu" and dtype == torch.float32:
        best = max(best, _ort_matmul_gflops(sizes, seconds, threads=threads))
    if device == "cpu" and dtype in (torch.float32, torch.bfloat16):
        hint = "f32" if dtype == torch.float32 else "bf16"
        best = max(best, _openvino_matmul_gflops(sizes, seconds, hint, threads=threads))
    return best


def int8_matmul_peak_gflops(
    sizes: tuple[int, ...] = (1024, 2048, 4096), seconds: float = 1.0, threads: int | None = None
) -> float:
    """int8 matmul rate (2 n^3 operations per product, as for FLOPs), the best of OpenVINO and ONNX Runtime.

    Measured on what the int8 engines run: a QDQ MatMul (activations
    quantized per tensor on the fly, int8 weights dequantized per tensor),
    which both runtimes execute as one u8/s8 x s8 integer product (VNNI or
    AMX-INT8 where present).  0 where neither runtime is installed.
    """
    return max(
        _ort_matmul_gflops(sizes, seconds, int8=True, threads=threads),
        _openvino_matmul_gflops(sizes, seconds, "f32", int8=True, threads=threads),
    )


def _matmul_onnx(n: int, int8: bool = False) -> bytes | None:
    """A one-node ONNX model C = A @ B for float32 [n, n] inputs (None without the onnx package).

    ``int8``: A is quantized and dequantized (QuantizeLinear/DequantizeLinear) and B is an int8 weight with its
    DequantizeLinear, as NNCF writes the int8 engines' products.
    """
    try:
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "ABC"]
    if not int8:
        graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "mm", io[:2], io[2:])
    else:
        weight = np.random.default_rng(0).integers(-127, 128, (n, n), dtype=np.int8)
        scale, zero = np.array(0.01, np.float32), np.array(0, np.int8)
        initializers = [
            numpy_helper.from_array(weight, "Bq"),
            numpy_helper.from_array(scale, "scale"),
            numpy_helper.from_array(zero, "zero"),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["A", "scale", "zero"], ["Aq"]),
            helper.make_node("DequantizeLinear", ["Aq", "scale", "zero"], ["Ad"]),
            helper.make_node("DequantizeLinear", ["Bq", "scale", "zero"], ["Bd"]),
            helper.make_node("MatMul", ["Ad", "Bd"], ["C"]),
        ]
        graph = helper.make_graph(nodes, "mm_int8", io[:1], io[2:], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _matmul_feeds(n: int, int8: bool) -> dict[str, Any]:
    import numpy as np

    names = "A" if int8 else "AB"
    return {name: np.random.randn(n, n).astype(np.float32) for name in names}


def _ort_matmul_gflops(sizes: tuple[int, ...], seconds: float, int8: bool = False, threads: int | None = None) -> float:
    """MatMul rate of ONNX Runtime's own kernels (MLAS): fp32, which runs faster than torch's here, or int8 (QDQ)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return 0.0
    best = 0.0
    for n in sizes:
        model = _matmul_onnx(n, int8)
        if model is None:
            return 0.0
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default, all cores
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        feeds = _matmul_feeds(n, int8)
        stats = time_ms(lambda s=session, f=feeds: s.run(None, f), warmup=2, repeats=3, min_seconds=seconds)
        best = max(best, 2 * n**3 / (stats["min_ms"] * 1e-3) / 1e9)
    return best


def _openvino_matmul_gflops(
    sizes: tuple[int, ...], seconds: float, hint: str, int8: bool = False, threads: int | None = None
) -> float:
    """MatMul rate of OpenVINO on the CPU at inference precision ``hint`` (f32 or bf16; int8 for a QDQ model),
    one stream of ``threads`` threads (None: all cores)."""
    try:
        import openvino as ov
    except ImportError:
        return 0.0
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    best = 0.0
    for n in sizes:
        model = _matmul_onnx(n, int8)
        if model is None:
            return 0.0
        request = core.compile_model(core.read_model(model, b""), "CPU", config).create_infer_request()
        feeds = _matmul_feeds(n, int8)
        stats = time_ms(lambda r=request, f=feeds: r.infer(f), warmup=2, repeats=3, min_seconds=seconds)
        best = max(best, 2 * n**3 / (stats["min_ms"] * 1e-3) / 1e9)
    return best


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_DECIDING_FLAGS = frozenset(
    {"avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile", "fma"}
)


def machine_info() -> dict[str, Any]:
    """Machine and library versions, recorded with every result file."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        # The flags that decide which backend and precision is fastest (bf16, int8 matrix units), as lscpu names them.
        "cpu_flags": " ".join(sorted(f for f in cpu_flags() if f in _DECIDING_FLAGS))
        or "none of " + " ".join(sorted(_DECIDING_FLAGS)),
        "amx_bf16": "amx_bf16" in cpu_flags(),
        "avx512_bf16": "avx512_bf16" in cpu_flags(),
        "avx512f": "avx512f" in cpu_flags(),
    }
    for lib in ("onnx", "onnxruntime", "openvino", "tensorrt"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            info[lib] = None
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["driver"] = _nvidia_driver()
    return info


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version nvidia-smi reports, or None without it."""
    import subprocess

    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max())


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    ref = b.double().cpu()
    return float((a.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30))


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB of images in [-1, 1] (range 2); infinite for identical images."""
    mse = float(((a.double().cpu() - b.double().cpu()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


class Report:
    """Rows of named tables, written as JSON, Markdown and plots at the end of the run."""

    def __init__(self) -> None:
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.notes: list[str] = []
        self.machine = machine_info()
        self.started = datetime.datetime.now(datetime.timezone.utc)

    def add(self, table: str, **row: Any) -> None:
        self.tables.setdefault(table, []).append(row)

    def markdown(self) -> str:
        lines = [
            f"# Benchmark results ({self.started:%Y-%m-%d %H:%M} UTC)",
            "",
            "Machine: " + ", ".join(f"{k} {v}" for k, v in self.machine.items() if v not in (None, "")),
            "",
        ]
        for name, rows in self.tables.items():
            lines += [f"## {name}", "", *_markdown_table(rows), ""]
        if self.notes:
            lines += ["## Notes", "", *[f"- {n}" for n in self.notes], ""]
        return "\n".join(lines)

    def save(self, out_dir: Path = RESULTS_DIR, *, plots: bool = True) -> Path:
        """Write results.json, summary.md and plots to results/<timestamp>/ and mirror them to results/latest/;
        with LEGO_BENCH_OUT set, results.json and summary.md go flat into that directory."""
        if FLAT_OUT is not None:
            dirs = [FLAT_OUT]
            plots = False  # a bounded set of files there (gpu.sh); the tables hold the figures
        else:
            dirs = [out_dir / self.started.strftime("%Y%m%d-%H%M%S"), out_dir / "latest"]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            payload = {"machine": self.machine, "started": self.started.isoformat(), "tables": self.tables}
            write_atomic(d / "results.json", json.dumps(payload, indent=1, default=_json_default))
            write_atomic(d / "summary.md", self.markdown())
            if plots:
                _plots(self.tables, d)
        return dirs[0]


def artifact_dir() -> Path:
    """Where a benchmark writes files beside its tables (profiler traces): LEGO_BENCH_OUT, else results/latest/."""
    out = FLAT_OUT if FLAT_OUT is not None else RESULTS_DIR / "latest"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return str(obj)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |" for row in rows]
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table for the terminal."""
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    cells = [[_fmt(row.get(c, "")) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _plots(tables: dict[str, list[dict[str, Any]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [r for r in tables.get("speed", []) if r.get("batch") == 1 and "pixels" in r]
    if speed:
        fig, ax = plt.subplots(figsize=(6, 4))
        for model, backend in sorted({(r["model"], r["backend"]) for r in speed}):
            mine = [r for r in speed if r["model"] == model and r["backend"] == backend]
            pts = sorted((r["pixels"], r["ms_per_call"]) for r in mine)
            ax.plot([p for p, _ in pts], [t for _, t in pts], marker="o", label=f"{model} / {backend}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pixels per image (H x W)")
        ax.set_ylabel("ms per denoiser call (batch 1)")
        ax.set_title("Time per denoiser call vs resolution")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "time_vs_resolution.png", dpi=120)
        plt.close(fig)
    quality = [r for r in tables.get("quality", []) if "relative_cost" in r]
    if quality:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([r["relative_cost"] for r in quality], [r["accuracy"] for r in quality])
        for r in quality:
            ax.annotate(str(r["plan"]), (r["relative_cost"], r["accuracy"]), fontsize=6)
        ax.set_xlabel("relative FLOP cost of the sampling run")
        ax.set_ylabel("classifier accuracy on the requested class")
        ax.set_title("Quality vs cost of skip plans (shipped model)")
        fig.tight_layout()
        fig.savefig(out / "quality_vs_cost.png", dpi=120)
        plt.close(fig)
