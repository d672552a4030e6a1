"""Torch backend: the reference LegoModel itself behind the backend interface.

Eager and engine paths then share the chain, the sampler and the CUDA graphs:
on a GPU without TensorRT this backend with CUDA graphs is the fast path.
The weights come from the checkpoint the manifest records (its sha256 is
verified, or its random-init seed replayed) or from ``--checkpoint``.

``precision="bf16"`` runs the model in bfloat16, so that eager and engine
paths can be compared at equal precision: on the CPU the model itself with
its patch embedding as a matmul (:func:`lego_model.forwards.patch_matmul_copy`,
weights shared) under autocast (the weights stay fp32; torch casts them for
each matmul, which its bf16 kernels need anyway), on a GPU through the exported bf16 forwards
(:func:`lego_model.forwards.engine_forward`: weights cast once, LayerNorm, the attention softmax
and the timestep sinusoid kept in fp32, float32 I/O), which CUDA graphs capture.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from export.records import contract_io
from lego_model.checkpoints import file_sha256, load_checkpoint
from lego_model.configs import get_config
from lego_model.errors import CheckpointError
from lego_model.flops import check_memory
from lego_model.forwards import engine_forward, patch_matmul_copy
from lego_model.model import LegoModel
from lego_model.shipped import shipped_checkpoint
from runtimes.backends.base import (
    DECODER_OPTIONS,
    Backend,
    BackendKind,
    BackendOptions,
    EngineCall,
    check_threads,
    manifest_weights,
)
from runtimes.backends.precision import INT8, resolve_precision
from runtimes.cuda import Cuda, require_cuda
from runtimes.errors import BackendError

if TYPE_CHECKING:
    from export.records import Manifest

log = logging.getLogger(__name__)


def manifest_checkpoint_path(manifest: Manifest, engine_dir: str | Path) -> Path | None:
    """The checkpoint file a manifest names, looked up as written, then inside the engine directory."""
    recorded = manifest.checkpoint.path
    if not recorded:
        return None
    for candidate in (Path(recorded), Path(engine_dir) / recorded, Path(engine_dir) / Path(recorded).name):
        if candidate.is_file():
            return candidate
    return Path(recorded)


def model_from_manifest(manifest: Manifest, engine_dir: str | Path) -> LegoModel:
    """The eager model the engines were exported from: verified checkpoint, or replayed random init."""
    ckpt = manifest.checkpoint
    if ckpt.random_init_seed is not None:
        return LegoModel(manifest.config).randomize_(ckpt.random_init_seed).eval()
    path = manifest_checkpoint_path(manifest, engine_dir)
    if path is None or not path.is_file():
        raise CheckpointError(
            f"the manifest in {engine_dir} names checkpoint {ckpt.path!r}, which is not here; pass it with --checkpoint"
        )
    if file_sha256(path) != ckpt.sha256:
        raise CheckpointError(
            f"checkpoint {path} is not the one the engines in {engine_dir} were exported from (sha256 differs); "
            "pass the right file with --checkpoint or re-export"
        )
    return load_checkpoint(path, manifest.config)


class TorchBackend(Backend):
    """The embedder and bricks of a LegoModel, run eagerly (and capturable into CUDA graphs).

    The caller's model is never modified: it is run as it is when it already
    sits on ``device`` in eval mode, and a copy is moved there otherwise (also
    for a model in training mode, whose flag ``.eval()`` would flip).  A CUDA
    ``device`` where torch sees no GPU is refused here, with a BackendError.  Calls run under
    ``torch.no_grad()``, so the weights' ``requires_grad`` is left as it is.
    ``threads`` (CPU) is applied when the backend loads, with
    ``torch.set_num_threads``: torch's intra-op threads are the process's, so
    the setting holds for every torch computation of the process.
    """

    name = "torch"

    def __init__(
        self,
        model: LegoModel,
        *,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        cuda: Cuda | None = None,
        threads: int | None = None,
    ) -> None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):  # 'tpu', 'cpu:x', 5 (torch reads an int as an accelerator's index)
            raise BackendError(f"the torch backend runs on 'cpu' or 'cuda[:N]', not {device!r}") from None
        if device.type == "cuda":
            device = require_cuda("the torch backend on a CUDA device", device.index or 0)
        elif device.type != "cpu":
            raise BackendError(f"the torch backend runs on 'cpu' or 'cuda[:N]', not {str(device)!r}")
        super().__init__(model.config, device)
        if cuda is not None:
            self.cuda = cuda
        self.source = model
        self.model = model
        self.supports_cuda_graphs = self.cuda.is_device(self.device)
        # The reference model runs fp32 unless bf16 is asked: auto does not lean to bf16 here.
        if precision == INT8:
            raise BackendError(
                "the torch backend runs the reference model in fp32 or bf16; int8 runs the files of "
                "lego-export --precision int8 on --backend openvino or onnxruntime-cpu"
            )
        self.precision, self.precision_why = resolve_precision(precision, self.device, auto_bf16=False, cuda=self.cuda)
        self._graphs: dict[str, tuple[torch.nn.Module, list[str], str]] = {}
        if threads is not None:
            check_threads(threads)
        self.threads = threads

    def load(self) -> None:
        if self.threads is not None and self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        src = self.source
        on_device = all(p.device == self.device for p in src.parameters())
        if on_device and not src.training:
            self.model = src
        else:  # nn.Module.to and .eval() work in place: move a copy, leave the caller's model alone
            self.model = copy.deepcopy(src).to(self.device).eval()
        if self.precision == "bf16" and self.device.type != "cuda":
            # CPU: the model itself under autocast, its patch embedding as a matmul (weights shared), where oneDNN's
            # AMX bf16 convolution miscomputed lego_S_PG_64's 8x8 stride-8 patches on 8 channels (relative L2
            # 0.96); its attention stays torch's fused SDPA (lego_model.forwards.patch_matmul_copy).
            self.model = patch_matmul_copy(self.model)
        elif self.precision == "bf16":
            # GPU: the exported bf16 forwards (weights cast once; LayerNorm, softmax, sinusoid in fp32); copies.
            engines = [("embedder", "embedder", None)]
            engines += [(f"brick{k}", "brick", k) for k in range(self.config.num_bricks)]
            for name, kind, brick in engines:
                inputs, outputs = contract_io(self.config, kind, brick)
                graph = engine_forward(self.model, kind, brick, "bf16").to(self.device)
                self._graphs[name] = (graph.requires_grad_(False), [t.name for t in inputs], outputs[0].name)
        self._load_vae()

    def check_shape(self, rows: int, height: int, width: int) -> None:
        """Also refuse, on a GPU, a batch whose activations alone exceed the device's free memory.

        There is no engine profile to bound a torch batch: without this a huge
        canvas ends in an OutOfMemoryError traceback after the first steps.
        """
        super().check_shape(rows, height, width)
        if self.cuda.is_device(self.device):
            free, _ = self.cuda.mem_get_info(self.device)
            check_memory(self.config, height, width, rows, available=free, where=f" on {self.device}")

    def engine_weights(self, engine: str) -> torch.nn.Module:
        """The whole model: a broken weight anywhere upstream is named, whichever engine's output went bad first."""
        return self.model

    def close(self) -> None:
        self._graphs.clear()
        self.model = self.source  # drop a copy made by load(); the source belongs to the caller

    def infer(self, call: EngineCall, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> None:
        self.require_loaded()
        if self.decodes_eagerly(call):
            return self._eager_decode(inputs, outputs)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16")
        if self._graphs:
            graph, names, out = self._graphs[call.engine]
            with torch.no_grad(), autocast:  # autocast is a CPU one: no effect on a GPU's bf16 forwards
                outputs[out].copy_(graph(*(inputs[n] for n in names)))
            return
        with torch.no_grad(), autocast:
            if call.brick is None:
                outputs["cond"].copy_(self.model.embed(inputs["c_noise"], inputs.get("class_labels")))
            else:
                brick = self.model.bricks[call.brick]
                outputs["f"].copy_(brick(inputs["x_in"], inputs.get("f_prev"), inputs["cond"]))


# ---------------------------------------------------------------------------- registry entry

RANDOM_INIT_SEED = 0  # --random-init weights, as lego-export --random-init draws them by default


def _build(manifest: Manifest | None, engine_dir: Path | None, opts: BackendOptions) -> TorchBackend:
    """The reference model of a checkpoint (a file or a LegoModel), random weights, the manifest's, or the shipped."""
    if opts.config is not None and opts.checkpoint is None and not opts.random_init:
        raise BackendError("--config names the architecture of a --checkpoint or of --random-init; leave it out")
    if opts.random_init:
        if opts.checkpoint is not None or opts.config is None:
            raise BackendError("--random-init needs --config NAME (and no --checkpoint)")
        model = LegoModel(get_config(opts.config)).randomize_(RANDOM_INIT_SEED).eval()
        weights = f"random init seed {RANDOM_INIT_SEED}"
    elif isinstance(opts.checkpoint, LegoModel):
        model, weights = opts.checkpoint, "a LegoModel in memory"
        if opts.config is not None and opts.config != model.config.name:
            raise BackendError(
                f"config {opts.config!r} names another model than the LegoModel given ({model.config.name}): leave "
                "config out, a LegoModel carries its own"
            )
    elif opts.checkpoint is not None or manifest is None:
        path = opts.checkpoint if opts.checkpoint is not None else shipped_checkpoint()
        model = load_checkpoint(path, opts.config or (manifest.config if manifest is not None else None))
        weights = f"sha256:{file_sha256(path)}"
    else:
        model, weights = model_from_manifest(manifest, engine_dir), manifest_weights(manifest)
    if manifest is not None and model.config != manifest.config:
        raise BackendError(
            f"--checkpoint holds {model.config.name}, the engine directory {engine_dir} is {manifest.config.name}; "
            "pass that model's checkpoint, or leave out --engine-dir"
        )
    device = opts.device
    if device is None:
        device = torch.device("cuda", opts.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    backend = TorchBackend(model, device=device, precision=opts.precision, threads=opts.threads)
    backend.manifest, backend.weights = manifest, weights
    return backend


KIND = BackendKind(
    name="torch",
    format=None,
    problem=lambda manifest, opts: None,
    build=_build,
    uses=frozenset({"threads", "precision", "device", "checkpoint", "config", "random_init"}) | DECODER_OPTIONS,
    chosen="the reference model",
)
