"""The brick chain: one denoiser call D(x; sigma, y) through a backend's engines (DESIGN.md).

    cond  = embed(c_noise(sigma), y)            embedder engine
    x_in  = concat(c_in(sigma) * x, coords)
    f     = 0;  for k in A (ascending): f = brick_k(x_in, f, cond)
    D     = c_skip(sigma) * x + c_out(sigma) * f

:class:`BrickChain` is a :class:`lego_model.sampler.Denoiser`: the sampler of
``lego_model`` drives it unchanged.  Everything it touches is allocated once
per (batch, H, W, guidance) in :class:`ChainBuffers` and reused at every step:
the coordinate channels of ``x_in`` and the null label rows are written once,
``f`` ping-pongs between two buffers (a brick never reads and writes the same
one), and a skipped brick is simply absent from the step's call list.  The
EDM arithmetic reuses ``lego_model.precond`` on the backend's device, in the
eager model's float32 order of operations, so that both paths agree to
rounding.  With CUDA graphs the whole call (EDM math and every active brick)
is captured per (batch, H, W, active set, guidance) and replayed.

NaN/Inf: after every engine a device-side flag records the first denoiser
call at which that engine produced a non-finite value.  On the CPU it is read
after every call; on CUDA once per batch (reading it per step would be a host
synchronisation inside the step loop); either way the run stops with a
:class:`NonFiniteError` naming the engine and the sampling step.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lego_model.errors import ShapeError
from lego_model.precond import canvas_coords, check_active, edm_scalings, guidance_labels, guide
from lego_model.sampler import Solver, evaluations_per_step
from runtimes.backends.base import Backend, BoundShape
from runtimes.errors import NonFiniteError
from runtimes.graphs import CudaGraphCache, GraphKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineCall:
    """One engine run inside a denoiser call: which engine, where f_prev comes from, where the output goes.

    ``src`` is None for engines without ``f_prev`` (the embedder, brick 0),
    ``"zeros"`` for the first active brick when brick 0 is skipped, else the
    ping-pong buffer ``"f0"``/``"f1"`` the previous active brick wrote.
    """

    engine: str
    brick: int | None
    src: str | None
    dst: str


def binding_plan(active: Sequence[int], num_bricks: int) -> tuple[EngineCall, ...]:
    """The engine calls of one denoiser call with the given active bricks; skipped bricks do not appear."""
    calls = [EngineCall("embedder", None, None, "cond")]
    for i, k in enumerate(check_active(active, num_bricks)):
        src = None if k == 0 else ("zeros" if i == 0 else f"f{(i - 1) % 2}")
        calls.append(EngineCall(f"brick{k}", k, src, f"f{i % 2}"))
    return tuple(calls)


def step_of_call(call: int, num_steps: int, solver: Solver) -> int:
    """Sampling step (0-based) of the ``call``-th denoiser call (1-based) of an EDM run."""
    for step, total in enumerate(itertools.accumulate(evaluations_per_step(num_steps, solver))):
        if call <= total:
            return step
    return num_steps - 1


class ChainBuffers:
    """Every tensor of a denoiser call at one (batch, H, W, guidance), allocated once.

    Engine rows are [cond; null] under guidance, so ``rows`` is twice the batch.
    """

    def __init__(self, backend: Backend, batch: int, height: int, width: int, guided: bool) -> None:
        cfg, dev, dt = backend.config, backend.device, backend.dtypes
        C, D, L = cfg.img_channels, cfg.hidden_size, cfg.label_dim
        self.batch, self.height, self.width, self.guided = batch, height, width, guided
        self.rows = rows = 2 * batch if guided else batch
        self.shape = BoundShape(rows, height, width)
        # Inputs of the denoiser call (the static inputs of a CUDA graph) and its output.
        self.x = torch.zeros(batch, C, height, width, dtype=torch.float64, device=dev)
        self.sigma = torch.ones(batch, dtype=torch.float64, device=dev)
        self.x32 = torch.zeros(batch, C, height, width, dtype=torch.float32, device=dev)
        self.out = torch.zeros(batch, C, height, width, dtype=torch.float32, device=dev)
        # Engine I/O.
        self.c_noise = torch.zeros(rows, dtype=dt.c_noise, device=dev)
        self.labels = torch.zeros(rows, L, dtype=dt.class_labels, device=dev) if L else None  # null rows stay 0
        self.cond = torch.zeros(rows, D, dtype=dt.cond, device=dev)
        self.x_in = torch.zeros(rows, C + 2, height, width, dtype=dt.x_in, device=dev)
        self.x_in[:, C:] = canvas_coords(height, width, device=dev)  # constant per shape: written once
        self.slots = {
            "zeros": torch.zeros(rows, C, height, width, dtype=dt.f, device=dev),
            "f0": torch.zeros(rows, C, height, width, dtype=dt.f, device=dev),
            "f1": torch.zeros(rows, C, height, width, dtype=dt.f, device=dev),
            "cond": self.cond,
        }
        self._feeds: dict[EngineCall, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}

    def set_labels(self, labels: Tensor | None) -> None:
        """One-hot labels [batch, label_dim] of this batch (None: the null label), [cond; null] under guidance."""
        if self.labels is None:
            return
        if labels is None:
            self.labels.zero_()
            return
        rows = guidance_labels(labels) if self.guided else labels
        self.labels.copy_(rows)

    def feeds(self, call: EngineCall) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(inputs, outputs) of ``call`` by engine tensor name; built once per call."""
        found = self._feeds.get(call)
        if found is None:
            if call.brick is None:
                inputs = {"c_noise": self.c_noise}
                if self.labels is not None:
                    inputs["class_labels"] = self.labels
                outputs = {"cond": self.cond}
            else:
                inputs = {"x_in": self.x_in}
                if call.src is not None:
                    inputs["f_prev"] = self.slots[call.src]
                inputs["cond"] = self.cond
                outputs = {"f": self.slots[call.dst]}
            found = self._feeds[call] = (inputs, outputs)
        return found


class BrickChain:
    """A denoiser ``chain(x, sigma, active) -> D`` over a backend's engines, for ``edm_sample``.

    Per batch: :meth:`begin` (shape, labels, guidance), the sampler's calls,
    then :meth:`end` (the NaN/Inf check).  The returned D is the chain's
    output buffer, overwritten by the next call (the sampler copies it at once).
    """

    def __init__(self, backend: Backend, *, cuda_graphs: bool = False, check_finite: bool = True) -> None:
        self.backend = backend
        self.config = backend.config
        self.device = backend.device
        self.check_finite = check_finite
        use_graphs = cuda_graphs and self.device.type == "cuda"
        if cuda_graphs and use_graphs and not backend.supports_cuda_graphs:
            log.info("%s cannot be captured into CUDA graphs; running without", backend.name)
            use_graphs = False
        self.graphs = CudaGraphCache(self.device) if use_graphs else None
        self.cfg_scale: float | None = None
        self._buffers: dict[tuple[int, int, int, bool], ChainBuffers] = {}
        self._cur: ChainBuffers | None = None
        self._plans: dict[tuple[int, ...], tuple[EngineCall, ...]] = {}
        self._num_steps: int | None = None
        self._solver: Solver = "heun"
        # Device-side NaN/Inf bookkeeping: calls so far, and per engine (embedder, brick0, ...) the first bad call.
        self._calls = torch.zeros((), dtype=torch.int64, device=self.device)
        self._first_bad = torch.full((1 + self.config.num_bricks,), -1, dtype=torch.int64, device=self.device)
        self.num_calls = 0

    # ---------------------------------------------------------------- checks before any compute
    def check(self, batch: int, height: int, width: int, cfg_scale: float | None = None) -> None:
        """Refuse a batch, size or guidance the engines cannot take (raises ShapeError / ProfileError)."""
        if cfg_scale is not None and not self.config.label_dim:
            raise ShapeError(
                f"{self.config.name} is unconditional: classifier-free guidance needs a class-conditional model; "
                "leave out --cfg-scale"
            )
        rows = 2 * batch if cfg_scale is not None else batch
        self.backend.check_shape(rows, height, width)

    # ---------------------------------------------------------------- per batch
    def begin(
        self,
        labels: Tensor | None,
        *,
        batch: int,
        height: int,
        width: int,
        cfg_scale: float | None = None,
        num_steps: int | None = None,
        solver: Solver = "heun",
    ) -> None:
        """Select (allocating on first use) the buffers of this shape, bind them, write labels, reset flags."""
        self.check(batch, height, width, cfg_scale)
        guided = cfg_scale is not None
        key = (batch, height, width, guided)
        bufs = self._buffers.get(key)
        if bufs is None:
            bufs = self._buffers[key] = ChainBuffers(self.backend, batch, height, width, guided)
        if bufs is not self._cur:
            self.backend.bind(bufs.shape)
            self._cur = bufs
        if labels is not None:
            labels = labels.to(self.device)
        bufs.set_labels(labels)
        self.cfg_scale = cfg_scale
        self._num_steps, self._solver = num_steps, solver
        self._calls.zero_()
        self._first_bad.fill_(-1)

    def __call__(self, x: Tensor, sigma: Tensor, active: tuple[int, ...]) -> Tensor:
        bufs = self._cur
        assert bufs is not None, "call BrickChain.begin() before sampling"
        plan = self._plans.get(active)
        if plan is None:
            plan = self._plans[active] = binding_plan(active, self.config.num_bricks)
        bufs.x.copy_(x)
        bufs.sigma.copy_(sigma)
        if self.graphs is not None:
            key = GraphKey.of(bufs.batch, bufs.height, bufs.width, active, self.cfg_scale)
            self.graphs.run(key, lambda: self._compute(bufs, plan))
        else:
            self._compute(bufs, plan)
        self.num_calls += 1
        if self.check_finite and self.device.type == "cpu":
            self._raise_if_nonfinite()
        return bufs.out

    def end(self) -> None:
        """End of a batch: one host read of the NaN/Inf flags (raises NonFiniteError)."""
        if self.check_finite:
            self._raise_if_nonfinite()

    # ---------------------------------------------------------------- the call itself
    def _compute(self, b: ChainBuffers, plan: tuple[EngineCall, ...]) -> None:
        """D for the static inputs b.x, b.sigma into b.out; no host sync, nothing but temporaries allocated."""
        C, B = self.config.img_channels, b.batch
        c_skip, c_out, c_in, c_noise = edm_scalings(b.sigma, self.config.sigma_data)  # float32, [B,1,1,1] / [B]
        b.x32.copy_(b.x)
        b.x_in[:B, :C] = c_in * b.x32  # the coordinate channels were written when the buffers were made
        b.c_noise[:B] = c_noise
        if b.guided:  # rows [cond; null] see the same x and sigma
            b.x_in[B:, :C] = b.x_in[:B, :C]
            b.c_noise[B:] = c_noise
        self._calls.add_(1)
        for call in plan:
            inputs, outputs = b.feeds(call)
            self.backend.infer(call, inputs, outputs)
            if self.check_finite:
                self._flag(call, b.slots[call.dst])
        f = b.slots[plan[-1].dst].to(torch.float32)
        if b.guided:
            f = guide(f, self.cfg_scale)
        torch.add(c_skip * b.x32, c_out * f, out=b.out)

    def _flag(self, call: EngineCall, out: Tensor) -> None:
        j = 0 if call.brick is None else 1 + call.brick
        slot = self._first_bad[j]
        bad = ~torch.isfinite(out).all()
        slot.copy_(torch.where(bad & (slot < 0), self._calls, slot))

    def _raise_if_nonfinite(self) -> None:
        flags = self._first_bad.tolist()
        bad = [(call, j) for j, call in enumerate(flags) if call >= 0]
        if not bad:
            return
        call, j = min(bad)
        engine = "the embedder" if j == 0 else f"brick {j - 1}"
        if self._num_steps is not None:
            where = f"sampling step {step_of_call(call, self._num_steps, self._solver)} of {self._num_steps}"
        else:
            where = f"denoiser call {call}"
        raise NonFiniteError(
            f"{engine} produced NaN/Inf at {where}; fp16 engines can overflow: re-export with "
            "--precision fp32 (or bf16), or skip that brick"
        )
