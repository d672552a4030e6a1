"""The brick chain: one denoiser call D(x; sigma, y) through a backend's engines (DESIGN.md).

    cond  = embed(c_noise(sigma), y)            embedder engine
    x_in  = concat(c_in(sigma) * x, coords)
    f     = 0;  for k in A (ascending): f = brick_k(x_in, f, cond)
    D     = c_skip(sigma) * x + c_out(sigma) * f

One batch is one ``with chain.batch(labels, batch=..., ...) as denoise:``
block; ``denoise`` is a :class:`lego_model.sampler.Denoiser` the sampler of
``lego_model`` drives unchanged.  Everything it touches is allocated once per
(batch, H, W, guidance) in :class:`ChainBuffers` -- kept in a bounded LRU
cache (``max_buffer_sets``, :meth:`BrickChain.clear`) -- and reused at every step:
the coordinate channels of ``x_in`` are written once per shape, the label rows
and the guidance scale once per batch, ``f`` ping-pongs between two buffers (a brick never
reads and writes the same one), and a skipped brick is simply absent from the
step's call list.  Both halves of the call around the engines are
``lego_model.precond``'s (prepare_inputs, combine_output) on these buffers,
so that chain and eager model agree to the bit for the same engines.

A whole sampling run is :meth:`BrickChain.sample`, inside the batch block:
the sampler's own program (:class:`lego_model.sampler.SamplingLoop`) over
the block's denoiser.  On CUDA with ``cuda_graphs`` the whole run -- every
step, both Heun evaluations, the update arithmetic, each step's bricks -- is
captured once per (batch, H, W, plan, solver, steps, schedule, guidance) and
a batch costs one replay; the latents and the churn noise (drawn from the
per-seed generators first) are copied into the loop's buffers before it.
Per-call graphs, captured per (batch, H, W, active set, guidance), are the
fallback: for ``edm_sample`` over the block's denoiser, for a run whose
buffers would not fit in half the free device memory, and for churn noise
over the sampler's budget.  Either way the guidance scale and the class
labels are device tensors the graphs read, so a new scale needs no capture.

Backends bind to whatever buffers they are handed (their own caches are keyed
by the buffers), so any number of chains may share one backend.  Threads: a
chain runs one batch at a time -- ``batch()`` holds the chain's lock for the
whole block, so a second thread waits for the first one's batch to end (and
one thread nesting two blocks is refused).  The caller's grad mode does not
matter: buffers are created outside inference mode and every call runs under
``torch.no_grad()``.

Misuse is refused with a :class:`runtimes.errors.UsageError` (or a
ShapeError/ProfileError for sizes the engines cannot take) before any engine
runs: labels that are not one-hot rows [batch, label_dim], latents of another
batch, size or channel count than the block's, sigma not of shape [batch],
a denoiser used outside its block.

NaN/Inf: on CUDA, after every engine a device-side flag records the first
denoiser call at which that engine produced a non-finite value, read once per
batch, when the ``with`` block ends (reading it per step would be a host
synchronisation inside the step loop).  On the CPU the output of every call is
read on the host, and a call that ended non-finite runs again engine by
engine to find the first bad one.  Either way the run stops with a
:class:`NonFiniteError` naming the engine and the sampling step.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from lego_model.configs import refuse_unconditional
from lego_model.eager import nonfinite_cause, nonfinite_message
from lego_model.precond import CallInputs, check_active, combine_output, engine_labels, prepare_inputs
from lego_model.sampler import Denoiser, LoopSpec, NonFiniteWatch, SamplingLoop, Solver, step_of_call
from runtimes.backends.base import Backend, EngineCall
from runtimes.errors import NonFiniteError, UsageError
from runtimes.graphs import CudaGraphCache, GraphKey, LoopKey

log = logging.getLogger(__name__)

LOOPS_PER_SHAPE = 4  # sampling loops (and their whole-run graphs) kept per buffer set, least recently used out


def binding_plan(active: Sequence[int], num_bricks: int) -> tuple[EngineCall, ...]:
    """The engine calls of one denoiser call with the given active bricks; skipped bricks do not appear."""
    calls = [EngineCall("embedder", None, None, "cond")]
    for i, k in enumerate(check_active(active, num_bricks)):
        src = None if k == 0 else ("zeros" if i == 0 else f"f{(i - 1) % 2}")
        calls.append(EngineCall(f"brick{k}", k, src, f"f{i % 2}"))
    return tuple(calls)


class ChainBuffers:
    """Every tensor of a denoiser call at one (batch, H, W, guidance), allocated once.

    Engine rows are [cond; null] under guidance, so ``rows`` is twice the batch.
    Created outside inference mode whatever the caller's mode, so that later
    calls under ``no_grad`` or grad mode may write into them.
    """

    @torch.inference_mode(False)
    def __init__(self, backend: Backend, batch: int, height: int, width: int, guided: bool) -> None:
        cfg, dev, dt = backend.config, backend.device, backend.dtypes
        C, D, L = cfg.img_channels, cfg.hidden_size, cfg.label_dim
        self.batch, self.height, self.width, self.guided = batch, height, width, guided
        self.rows = rows = 2 * batch if guided else batch
        # Inputs of the denoiser call (the static inputs of a CUDA graph) and its output.
        self.x = torch.zeros(batch, C, height, width, dtype=torch.float64, device=dev)
        self.sigma = torch.ones(batch, dtype=torch.float64, device=dev)
        self.scale = torch.ones((), dtype=torch.float32, device=dev)  # guidance scale, read by the captured call
        self.out = torch.zeros(batch, C, height, width, dtype=torch.float32, device=dev)
        # Engine I/O: x_in and c_noise live in the preconditioning's buffers.
        self.inputs = CallInputs.allocate(
            batch, C, height, width, guided=guided, device=dev, x_in_dtype=dt.x_in, c_noise_dtype=dt.c_noise
        )
        self.labels = torch.zeros(rows, L, dtype=dt.class_labels, device=dev) if L else None
        self.cond = torch.zeros(rows, D, dtype=dt.cond, device=dev)
        self.slots = {
            "zeros": torch.zeros(rows, C, height, width, dtype=dt.f, device=dev),
            "f0": torch.zeros(rows, C, height, width, dtype=dt.f, device=dev),
            "f1": torch.zeros(rows, C, height, width, dtype=dt.f, device=dev),
            "cond": self.cond,
        }
        self._feeds: dict[EngineCall, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}
        self.loops: OrderedDict[LoopSpec, SamplingLoop] = OrderedDict()  # whole runs at this shape, newest last

    def feeds(self, call: EngineCall) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(inputs, outputs) of ``call`` by engine tensor name; built once per call."""
        found = self._feeds.get(call)
        if found is None:
            if call.brick is None:
                inputs = {"c_noise": self.inputs.c_noise}
                if self.labels is not None:
                    inputs["class_labels"] = self.labels
                outputs = {"cond": self.cond}
            else:
                inputs = {"x_in": self.inputs.x_in}
                if call.src is not None:
                    inputs["f_prev"] = self.slots[call.src]
                inputs["cond"] = self.cond
                outputs = {"f": self.slots[call.dst]}
            found = self._feeds[call] = (inputs, outputs)
        return found


class BrickChain:
    """Denoiser calls D(x; sigma, active) over a backend's engines, one ``with chain.batch(...)`` per batch.

    ``batch`` yields the denoiser for ``edm_sample``; the D it returns is the
    chain's output buffer, overwritten by the next call (the sampler copies it
    at once).  Inside the block, :meth:`sample` runs a whole sampling loop
    (with ``cuda_graphs`` on CUDA: one replay of a captured run, see the module
    doc; ``loop_graphs=False`` keeps per-call graphs).  Calls run under
    ``torch.no_grad()``.  ``max_buffer_sets`` bounds the buffer sets (and their
    sampling loops and CUDA graphs) kept for reuse, least recently used first
    out; :meth:`clear` drops them all.  Thread-safe: one batch block at a time
    per chain (the others wait on its lock); chains on one backend may run in
    several threads (their graphs and TensorRT work are serialised per device,
    see :mod:`runtimes.graphs`).
    """

    @torch.inference_mode(False)
    def __init__(
        self,
        backend: Backend,
        *,
        cuda_graphs: bool = False,
        check_finite: bool = True,
        max_buffer_sets: int = 8,
        loop_graphs: bool = True,
    ) -> None:
        if not isinstance(backend, Backend):
            raise UsageError(
                f"backend: expected a runtimes Backend (open_backend(...)[0]), got {type(backend).__name__}"
            )
        if isinstance(max_buffer_sets, bool) or not isinstance(max_buffer_sets, int) or max_buffer_sets < 1:
            raise UsageError(f"max_buffer_sets must be an int of at least 1, got {max_buffer_sets!r}")
        for name, flag in (("cuda_graphs", cuda_graphs), ("check_finite", check_finite), ("loop_graphs", loop_graphs)):
            if not isinstance(flag, bool):
                raise UsageError(f"{name}: expected True or False, got {flag!r}")
        self.backend = backend
        self.config = backend.config
        self.device = backend.device
        self.check_finite = check_finite
        cuda = backend.cuda
        # On the CPU a host read costs nothing extra; on CUDA it would synchronise inside the step loop.
        self.check_each_call = check_finite and not cuda.is_device(self.device)
        use_graphs = cuda_graphs and cuda.is_device(self.device)
        if cuda_graphs and use_graphs and not backend.supports_cuda_graphs:
            log.info("%s cannot be captured into CUDA graphs; running without", backend.name)
            use_graphs = False
        self.graphs = CudaGraphCache(self.device, cuda) if use_graphs else None
        self.loop_graphs = loop_graphs  # sample() captures whole runs (with graphs on); else per call
        self.max_buffer_sets = max_buffer_sets
        self._buffers: OrderedDict[tuple[int, int, int, bool], ChainBuffers] = OrderedDict()  # LRU, newest last
        self._open: ChainBuffers | None = None  # the buffers of the batch block in progress
        self._open_denoiser: Denoiser | None = None  # and its denoiser
        self._lock = threading.Lock()  # held for a whole batch block
        self._owner: int | None = None  # the thread inside a batch block
        self._plans: dict[tuple[int, ...], tuple[EngineCall, ...]] = {}
        self._num_steps: int | None = None
        self._solver: Solver = "heun"
        self._cfg_scale: float | None = None  # of the batch in progress, for a NaN/Inf report
        self._churn = False
        # NaN/Inf bookkeeping, per engine (embedder, brick0, ...) the first bad denoiser call: device-side on a GPU
        # (no host sync inside the step loop or a capture), read on the host on the CPU (see _compute).
        self._watch = NonFiniteWatch(
            1 + self.config.num_bricks, self.device, host_reads=not cuda.is_device(self.device)
        )

    # ---------------------------------------------------------------- checks before any compute
    def check(self, batch: int, height: int, width: int, cfg_scale: float | None = None) -> None:
        """Refuse a batch, size or guidance the engines cannot take (raises ShapeError / ProfileError)."""
        for name, value in (("batch", batch), ("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive int, got {value!r}")
        self.config.check_guidance(cfg_scale)
        rows = 2 * batch if cfg_scale is not None else batch
        self.backend.check_shape(rows, height, width)

    # ---------------------------------------------------------------- one batch
    @contextmanager
    def batch(
        self,
        labels: Tensor | None,
        *,
        batch: int,
        height: int,
        width: int,
        cfg_scale: float | None = None,
        num_steps: int | None = None,
        solver: Solver = "heun",
        churn: bool = False,
    ) -> Iterator[Denoiser]:
        """Denoiser calls for one batch; the NaN/Inf check runs when the block ends, also when it raises.

        labels: one-hot [batch, label_dim] or None (the null label).  ``num_steps``,
        ``solver`` and ``churn`` (whether the sampler adds churn noise) only serve a
        NaN/Inf report: the step it names, the causes it suspects.  An error
        raised inside the block is never masked: NaN/Inf found after it is added
        to it as a note.
        """
        if self._owner == threading.get_ident():
            raise UsageError("chain.batch() blocks do not nest: finish the open block first (they share the NaN flags)")
        self.check(batch, height, width, cfg_scale)
        self.check_labels(labels, batch)
        self.backend.require_loaded()
        with self._lock:
            self._owner = threading.get_ident()
            try:
                self._cfg_scale, self._churn = cfg_scale, churn
                with self._block(labels, batch, height, width, cfg_scale, num_steps, solver) as denoise:
                    yield denoise
            finally:
                self._owner = None

    @contextmanager
    def _block(self, labels, batch, height, width, cfg_scale, num_steps, solver) -> Iterator[Denoiser]:
        guided = cfg_scale is not None
        bufs = self._buffer_set(batch, height, width, guided)
        with torch.inference_mode(False), torch.no_grad():
            engine_labels(
                None if labels is None else labels.to(self.device, torch.float32),
                batch,
                self.config,
                guided=guided,
                out=bufs.labels,
            )
            if guided:
                bufs.scale.fill_(cfg_scale)
            self._watch.reset()
        self._num_steps, self._solver = num_steps, solver
        self._open = bufs
        C = self.config.img_channels

        def denoise(x: Tensor, sigma: Tensor, active: tuple[int, ...]) -> Tensor:
            if self._open is not bufs:
                raise UsageError("this denoiser belongs to a finished chain.batch() block; open a new block")
            if not isinstance(x, Tensor) or tuple(x.shape) != (batch, C, height, width) or not x.is_floating_point():
                got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
                raise UsageError(
                    f"x: expected a float tensor of shape {(batch, C, height, width)} "
                    f"([batch, channels, height, width] of this block), got {got}"
                )
            if not isinstance(sigma, Tensor) or tuple(sigma.shape) not in ((batch,), ()):
                got = tuple(sigma.shape) if isinstance(sigma, Tensor) else type(sigma).__name__
                raise UsageError(f"sigma: expected a tensor of shape ({batch},) (one noise level per image), got {got}")
            with torch.inference_mode(False), torch.no_grad():  # the buffers are normal tensors
                return self._denoise(bufs, x, sigma, active)

        self._open_denoiser = denoise
        try:
            yield denoise
        except BaseException as err:
            if self.check_finite and not isinstance(err, NonFiniteError):
                try:
                    self._raise_if_nonfinite()
                except NonFiniteError as nonfinite:
                    err.add_note(f"also: {nonfinite}")
            raise
        else:
            if self.check_finite:
                self._raise_if_nonfinite()
        finally:
            self._open = None
            self._open_denoiser = None

    def check_labels(self, labels: Tensor | None, batch: int) -> None:
        """Refuse labels that are not one-hot (or soft) rows [batch, label_dim], naming what to pass instead."""
        L = self.config.label_dim
        if labels is None:
            return
        if not L:
            refuse_unconditional(self.config.name, L, "class labels")
        hint = f"one-hot rows of shape ({batch}, {L}), e.g. torch.nn.functional.one_hot(classes, {L}).float()"
        if not isinstance(labels, Tensor):
            raise UsageError(f"labels: expected a tensor of {hint}, got {type(labels).__name__}")
        if labels.dim() == 1 and not labels.is_floating_point():
            raise UsageError(f"labels: got class indices of shape {tuple(labels.shape)}; pass {hint}")
        if not labels.is_floating_point():
            raise UsageError(f"labels: expected a float tensor of {hint}, got dtype {labels.dtype}")
        if tuple(labels.shape) != (batch, L):
            raise UsageError(f"labels: expected {hint}, got shape {tuple(labels.shape)}")

    def _buffer_set(self, batch: int, height: int, width: int, guided: bool) -> ChainBuffers:
        """The buffers of this shape (least recently used set, and its graphs, evicted past the bound)."""
        key = (batch, height, width, guided)
        bufs = self._buffers.get(key)
        if bufs is not None:
            self._buffers.move_to_end(key)
            return bufs
        bufs = self._buffers[key] = ChainBuffers(self.backend, batch, height, width, guided)
        while len(self._buffers) > self.max_buffer_sets:
            old, _ = self._buffers.popitem(last=False)
            if self.graphs is not None:  # their graphs point into the evicted buffers
                self.graphs.discard(lambda k, old=old: _buffer_key(k) == old)
        return bufs

    def clear(self) -> None:
        """Drop every buffer set (and CUDA graph); the next batch of each shape allocates afresh."""
        if self._owner == threading.get_ident():
            raise UsageError("chain.clear() inside a chain.batch() block: clear after the block ends")
        with self._lock:
            self._buffers.clear()
            if self.graphs is not None:
                self.graphs.discard(lambda k: True)

    def __len__(self) -> int:
        """Buffer sets kept."""
        return len(self._buffers)

    def _denoise(self, bufs: ChainBuffers, x: Tensor, sigma: Tensor, active: tuple[int, ...]) -> Tensor:
        plan = self._plan(active)
        bufs.x.copy_(x)
        bufs.sigma.copy_(sigma)
        if self.graphs is not None:
            key = GraphKey.of(bufs.batch, bufs.height, bufs.width, active, bufs.guided)
            self.graphs.run(key, lambda: self._compute(bufs, plan), generation=self.backend.generation)
        else:
            self._compute(bufs, plan)
        if self.check_each_call:
            if self._watch.first() is not None:
                self._name_first_bad_engine(bufs, plan)
            self._raise_if_nonfinite()
        return bufs.out

    # ---------------------------------------------------------------- a whole sampling run
    def sample(
        self,
        latents: Tensor,
        *,
        num_steps: int = 18,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        solver: Solver = "heun",
        S_churn: float = 0.0,
        S_min: float = 0.0,
        S_max: float = math.inf,
        S_noise: float = 1.0,
        randn_like: Callable[[Tensor], Tensor] = torch.randn_like,
        active_per_step: Sequence[tuple[int, ...]] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> Tensor:
        """One whole sampling run of the open batch block: the images of ``edm_sample`` over its denoiser.

        Takes ``edm_sample``'s arguments (without the denoiser; ``active_per_step``
        None runs every brick at every step) and returns a new float64 tensor on
        the chain's device.  With CUDA graphs the run is captured once per key
        and replayed (see the module doc); the result equals an uncaptured run to
        fp32 rounding.  ``on_step(i)``: after step i uncaptured; under a
        whole-run graph the device is not interrupted per step, so it is called
        for every step once the replay has finished.
        """
        bufs = self._open
        if bufs is None or self._owner != threading.get_ident():
            raise UsageError("chain.sample() runs inside a chain.batch() block, on the thread that opened it")
        C = self.config.img_channels
        if not isinstance(latents, Tensor) or tuple(latents.shape) != (bufs.batch, C, bufs.height, bufs.width):
            got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise UsageError(
                f"latents: expected shape {(bufs.batch, C, bufs.height, bufs.width)} "
                f"([batch, channels, height, width] of this block), got {got}"
            )
        if active_per_step is None:
            active_per_step = [tuple(range(self.config.num_bricks))] * num_steps
        spec = LoopSpec.of(
            latents.shape, num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, solver=solver,
            S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, active_per_step=active_per_step,
        )  # fmt: skip
        for active in set(spec.active):
            self._plan(active)  # refuses an empty or out-of-range brick set before anything runs
        self._num_steps, self._solver = num_steps, solver
        loop = self._loop(bufs, spec) if self.graphs is not None and self.loop_graphs else None
        if loop is None:  # per-call graphs (or none): the sampler over the block's denoiser
            latents = latents.to(self.device)
            loop = SamplingLoop(spec, device=self.device)  # edm_sample's program, with the spec checked above
            loop.load(latents, randn_like)
            return loop.run(self._open_denoiser, on_step)
        with torch.inference_mode(False), torch.no_grad():
            loop.load(latents.to(self.device), randn_like)
            denoise = self._loop_denoiser(bufs)
            key = LoopKey(spec, bufs.guided)
            self.graphs.run(key, lambda: loop.run(denoise), generation=self.backend.generation)
            images = loop.x.clone()
        if on_step is not None:
            self.graphs.lane.stream.synchronize()  # the run has finished: report its steps
            for i in range(num_steps):
                on_step(i)
        return images

    def _loop(self, bufs: ChainBuffers, spec: LoopSpec) -> SamplingLoop | None:
        """The cached sampling loop of ``spec`` at these buffers, or None where a whole-run graph cannot be used."""
        loop = bufs.loops.get(spec)
        if loop is not None:
            bufs.loops.move_to_end(spec)
            return loop
        need = spec.nbytes()
        free, _ = self.backend.cuda.mem_get_info(self.device)
        if need > free // 2:
            log.info("a whole-run graph needs %d MiB of %d MiB free: per-call graphs instead", need >> 20, free >> 20)
            return None
        loop = SamplingLoop(spec, device=self.device)
        if not loop.capturable:
            log.info("churn noise over the sampler's budget is drawn per step: per-call graphs instead")
            return None
        bufs.loops[spec] = loop
        while len(bufs.loops) > LOOPS_PER_SHAPE:
            old, _ = bufs.loops.popitem(last=False)
            self.graphs.discard(lambda k, old=old: isinstance(k, LoopKey) and k.spec == old)
        return loop

    def _plan(self, active: tuple[int, ...]) -> tuple[EngineCall, ...]:
        plan = self._plans.get(active)
        if plan is None:
            plan = self._plans[active] = binding_plan(active, self.config.num_bricks)
        return plan

    def _loop_denoiser(self, bufs: ChainBuffers) -> Denoiser:
        """Denoiser calls inside a whole-run capture: the loop hands well-formed tensors, no per-call graphs."""

        def denoise(x: Tensor, sigma: Tensor, active: tuple[int, ...]) -> Tensor:
            bufs.x.copy_(x)
            bufs.sigma.copy_(sigma)
            self._compute(bufs, self._plan(active))
            return bufs.out

        return denoise

    # ---------------------------------------------------------------- the call itself
    def _compute(self, b: ChainBuffers, plan: tuple[EngineCall, ...], *, every_engine: bool | None = None) -> None:
        """D for the static inputs b.x, b.sigma (and b.scale) into b.out: no host sync, no image-sized allocation.

        NaN/Inf: on CUDA (``every_engine`` None there) each engine's output has its device-side record; on the
        CPU only the call's last output is read (a NaN or Inf anywhere reaches it), and a bad call runs again
        with every engine watched to name the first bad one (:meth:`_name_first_bad_engine`): one read per
        call instead of one per engine (the shipped model's OpenVINO bf16 call at batch 8: 2.95 -> 2.91 ms).
        """
        if every_engine is None:
            every_engine = not self.check_each_call
        prepare_inputs(b.x, b.sigma, sigma_data=self.config.sigma_data, guided=b.guided, out=b.inputs)
        self._watch.next_call()
        last = plan[-1]
        for call in plan:
            inputs, outputs = b.feeds(call)
            self.backend.infer(call, inputs, outputs)
            if self.check_finite and (every_engine or call is last):
                self._watch.record(0 if call.brick is None else 1 + call.brick, b.slots[call.dst])
        combine_output(b.inputs, b.slots[last.dst], b.scale if b.guided else None, out=b.out)

    def _name_first_bad_engine(self, b: ChainBuffers, plan: tuple[EngineCall, ...]) -> None:
        """Run the denoiser call that ended non-finite again, every engine watched: its inputs are still in the
        buffers and the engines give the same outputs for them, so the record then names the first bad engine
        (kept as the last engine where the rerun comes out finite).  On the CPU the first bad call raises, so
        the record holds this call only."""
        kept = self._watch.first_bad.clone()
        self._watch.first_bad.fill_(-1)
        self._watch.calls.sub_(1)  # the rerun is the same denoiser call
        self._compute(b, plan, every_engine=True)
        if self._watch.first() is None:
            self._watch.first_bad.copy_(kept)

    def _raise_if_nonfinite(self) -> None:
        found = self._watch.first()
        if found is None:
            return
        call, j = found
        if self._num_steps is not None:
            where = f"sampling step {step_of_call(call, self._num_steps, self._solver)} of {self._num_steps}"
        else:
            where = f"denoiser call {call}"
        raise NonFiniteError(self._nonfinite_message(j, where))

    def _nonfinite_message(self, j: int, where: str) -> str:
        """What is known about a NaN/Inf from engine slot ``j``: engine, step, the precision that computed, and the
        cause its weights tell (lego_model.eager's one wording, the eager model's too)."""
        backend = self.backend
        engine, label = ("the embedder", "embedder") if j == 0 else (f"brick {j - 1}", f"brick{j - 1}")
        entries = getattr(backend, "entries", None) or {}
        # The precision that computed: the backend's (OpenVINO and torch choose it at load), or this engine's file
        # precision where the files differ among themselves (e.g. an fp32 embedder beside int8 bricks).
        precision = backend.precision
        if "/" in precision and label in entries:
            precision = entries[label].precision
        cause = nonfinite_cause(
            backend.engine_weights(label), cfg_scale=self._cfg_scale, churn=self._churn, precision=precision,
            reads_image=j != 0,
        )  # fmt: skip
        return nonfinite_message(engine, backend.name, precision, where, cause)


def _buffer_key(key: Hashable) -> tuple[int, int, int, bool]:
    """The buffer set (batch, H, W, guided) a graph key's graph points into."""
    if isinstance(key, LoopKey):
        B, _, H, W = key.spec.shape
        return (B, H, W, key.guided)
    return (key.batch, key.height, key.width, key.guided)


def _kwargs(spec: LoopSpec) -> dict:
    """edm_sample's keyword arguments of a loop spec."""
    return dict(
        num_steps=spec.num_steps, sigma_min=spec.sigma_min, sigma_max=spec.sigma_max, rho=spec.rho,
        solver=spec.solver, S_churn=spec.S_churn, S_min=spec.S_min, S_max=spec.S_max, S_noise=spec.S_noise,
        active_per_step=spec.active,
    )  # fmt: skip
