"""The sampler as a capture-safe program (lego_model.sampler.SamplingLoop): same images, no allocation, no host reads.

The reference below is EDM's Algorithm 2 as the authors' generate.py writes it (one allocating expression per
line, churn noise drawn inside the loop).  SamplingLoop performs the same float64 operations in the same order
into preallocated buffers, with the noise drawn before the loop in the same per-seed order; the comparisons
allow fp64 rounding only.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lego_model import LegoModel, SkipPlan, draw_latents, edm_sample, get_config
from lego_model.sampler import LoopSpec, SamplingLoop, edm_schedule

# Same float64 operations in the same order: equal but for the fused multiply-adds a CPU kernel may contract
# (one rounding instead of two, 2^-53 relative per operation).  About 10 operations per step over <= 12 steps,
# amplified at most by the step sizes' ratio sigma_max / sigma_min's contribution to |x| <= 80 * 4: 1e-10 is
# far above that and far below what one misplaced draw or coefficient gives (>= 1e-3).  Measured here: 0.
FP64_ATOL = 1e-10

CHURN = {"S_churn": 40.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}


def reference_edm(denoise, latents, *, num_steps, solver, randn_like, active_per_step, S_churn=0.0, S_min=0.0,
                  S_max=math.inf, S_noise=1.0):  # fmt: skip
    """EDM Heun/Euler with churn (Karras et al. 2022, Algorithm 2), written plainly."""
    t_steps = edm_schedule(num_steps).tolist()
    ones = torch.ones(latents.shape[0], dtype=torch.float64)
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        x_cur = x_next
        gamma = gamma_max if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * S_noise * randn_like(x_cur)
        denoised = denoise(x_hat, t_hat * ones, active_per_step[i]).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if solver == "heun" and i < num_steps - 1:
            denoised = denoise(x_next, t_next * ones, active_per_step[i]).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@pytest.fixture(scope="module")
def model():
    return LegoModel(get_config("tiny_PG_16")).randomize_(0).eval()


def _plans(config, steps):
    return {
        "all": SkipPlan(config.num_bricks).steps(steps),
        "global@0.5": SkipPlan.preset("global@0.5", config).steps(steps),
        "mixed": SkipPlan.parse(["2@0.5:1", "0@0:0.3"], config).steps(steps),
    }


# Every solver, churn, guidance and plan appears with each of the others at least once.
CASES = [
    ("heun", True, 2.5, "mixed"),
    ("heun", False, None, "all"),
    ("heun", True, None, "global@0.5"),
    ("euler", True, 2.5, "all"),
    ("euler", False, 2.5, "global@0.5"),
    ("euler", True, None, "mixed"),
]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, loaded CPU spinning threads cost seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("solver,churn,cfg_scale,plan", CASES)
def test_loop_equals_the_plain_reference(model, solver, churn, cfg_scale, plan):
    cfg, steps = model.config, 7
    active = _plans(cfg, steps)[plan]
    kw = dict(num_steps=steps, solver=solver, active_per_step=active, **(CHURN if churn else {}))
    runs = []
    for sampler in (reference_edm, edm_sample):
        latents, labels, rnd = draw_latents([3, 11], cfg.img_channels, 16, 32, cfg.label_dim)

        def denoise(x, sigma, act, labels=labels):
            return model(x, sigma, labels, act, cfg_scale)

        with torch.no_grad():
            runs.append(sampler(denoise, latents, randn_like=rnd.randn_like, **kw))
    torch.testing.assert_close(runs[1], runs[0], atol=FP64_ATOL, rtol=0)


def test_noise_over_the_budget_is_drawn_per_step_with_the_same_result(model):
    """A run whose churn noise would not fit the budget draws it inside the loop: same numbers, not capturable."""
    cfg, steps = model.config, 5
    active = SkipPlan(cfg.num_bricks).steps(steps)
    images = []
    for budget in (1 << 30, 0):
        latents, labels, rnd = draw_latents([7], cfg.img_channels, 16, 16, cfg.label_dim)
        spec = LoopSpec.of(latents.shape, num_steps=steps, active_per_step=active, **CHURN)
        loop = SamplingLoop(spec, noise_budget_bytes=budget)
        assert loop.capturable == (budget > 0)
        loop.load(latents, rnd.randn_like)
        images.append(loop.run(lambda x, s, a, labels=labels: model(x, s, labels, a)).clone())
    torch.testing.assert_close(images[1], images[0], atol=FP64_ATOL, rtol=0)


def test_draws_follow_the_authors_order_with_churn_off_on_some_steps():
    """Steps outside [S_min, S_max] still consume a draw (as the authors' loop does), and nothing is drawn after
    the last churned step; the preloaded slots hold exactly the draws of the churned steps."""
    draws = []

    def randn_like(x):
        draws.append(len(draws))
        return torch.full_like(x, float(len(draws)))

    steps = 8
    t = edm_schedule(steps).tolist()
    loop = SamplingLoop(
        LoopSpec.of((1, 1, 2, 2), num_steps=steps, all_bricks=(0,), S_churn=10.0, S_min=t[5], S_max=t[2])
    )
    loop.load(torch.zeros(1, 1, 2, 2), randn_like)
    assert len(draws) == 6  # steps 0..5 drawn, 6 and 7 never churn
    assert [float(n[0, 0, 0, 0]) for n in loop.noise] == [3.0, 4.0, 5.0, 6.0]  # steps 2..5


def test_sampler_refusals_are_unchanged():
    from lego_model.errors import LegoError

    with pytest.raises(LegoError, match="unknown solver"):
        LoopSpec.of((1, 1, 4, 4), num_steps=3, all_bricks=(0,), solver="dpm")
    with pytest.raises(LegoError, match="S_churn"):
        LoopSpec.of((1, 1, 4, 4), num_steps=3, all_bricks=(0,), S_churn=-1.0)
    with pytest.raises(LegoError, match="1 to 1000"):
        LoopSpec.of((1, 1, 4, 4), num_steps=0, all_bricks=(0,))


# --------------------------------------------------------------------------- nothing allocated, nothing read back
# Factory functions: they create a tensor from nothing (or from a tensor's metadata only).
FACTORIES = {
    "empty", "empty_strided", "empty_like", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
    "scalar_tensor", "arange", "linspace", "logspace", "eye", "rand", "rand_like", "randn", "randn_like",
    "randint", "randint_like", "randperm", "normal", "bernoulli", "new_empty", "new_zeros", "new_ones", "new_full",
    "new_empty_strided", "lift_fresh_copy", "_to_copy", "clone", "detach_copy",
}  # fmt: skip
# Ops that make the host wait for the device: a value read back, or an output whose size depends on values.
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_static", "masked_select", "unique",
              "_unique2", "unique_consecutive", "equal", "allclose"}  # fmt: skip


class LoopOps(TorchDispatchMode):
    """Every aten op inside the ``with`` block, sorted into factories, other allocations and host reads."""

    def __init__(self) -> None:
        super().__init__()
        self.factories: list[str] = []
        self.allocations: list[str] = []  # ops whose outputs are fresh tensors (no out=, not in place, not views)
        self.host_reads: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func.overloadpacket.__name__.removesuffix("_")
        schema = func._schema
        if name in HOST_READS or func.overloadpacket.__name__ in HOST_READS:
            self.host_reads.append(str(func))
        elif name in FACTORIES:
            self.factories.append(str(func))
        elif any(r.alias_info is None for r in schema.returns if str(r.type).startswith("Tensor")):
            self.allocations.append(str(func))
        return func(*args, **(kwargs or {}))


class HostCalls(TorchFunctionMode):
    """Tensor methods that read device values into Python (``.tolist()`` and ``.cpu()`` do not always dispatch)."""

    READS = frozenset({"tolist", "item", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "to"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS and not (name == "to" and not _to_host(args, kwargs or {})):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _to_host(args, kwargs) -> bool:
    """Whether a Tensor.to(...) call moves to the CPU (a host copy), as opposed to a dtype change on the device."""
    targets = [a for a in args[1:] if isinstance(a, (str, torch.device))] + [kwargs.get("device")]
    return any(t is not None and torch.device(t).type == "cpu" for t in targets)


def _loop_and_denoiser(device, solver, churn, plan_len=6):
    cfg = get_config("tiny_PG_16")
    shape = (2, cfg.img_channels, 16, 16)
    active = SkipPlan.parse(["2@0.5:1"], cfg).steps(plan_len)
    spec = LoopSpec.of(shape, num_steps=plan_len, solver=solver, active_per_step=active, **(CHURN if churn else {}))
    loop = SamplingLoop(spec, device=device)
    out = torch.zeros(shape, dtype=torch.float32, device=device)

    def denoise(x, sigma, act):  # D = 0.5 x, into a buffer of its own: a denoiser that allocates nothing
        torch.mul(x, 0.5, out=out)
        return out

    return loop, denoise, shape


@pytest.mark.parametrize("solver", ["heun", "euler"])
@pytest.mark.parametrize("churn", [False, True], ids=["deterministic", "churn"])
def test_the_loop_allocates_nothing_and_never_reads_the_device(solver, churn):
    loop, denoise, shape = _loop_and_denoiser("cpu", solver, churn)
    g = torch.Generator().manual_seed(0)
    loop.load(torch.randn(shape, generator=g), lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype))
    with LoopOps() as ops, HostCalls() as host:
        loop.run(denoise)
    assert ops.ops > 0  # the mode saw the loop's ops
    assert ops.factories == [] and ops.allocations == [] and ops.host_reads == [], (ops.factories, ops.allocations)
    assert host.calls == []


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_the_loop_runs_on_the_meta_device(solver):
    """Meta tensors have no values: any host read inside the loop (item, tolist, cpu, a data-dependent size)
    raises.  The whole program runs there, so it needs none."""
    loop, denoise, shape = _loop_and_denoiser("meta", solver, churn=True)
    loop.load(torch.empty(shape, device="meta"), torch.randn_like)
    out = loop.run(denoise)
    assert out.device.type == "meta" and tuple(out.shape) == shape


def test_the_counters_catch_what_they_look_for():
    """The modes above are not blind: an allocating, host-reading step is seen."""
    x = torch.ones(3, dtype=torch.float64)
    with LoopOps() as ops, HostCalls() as host:
        y = x * 2
        y.sum().item()
        torch.zeros(2)
        y.tolist()
    assert ops.allocations and ops.factories and ops.host_reads and "tolist" in host.calls


def test_nbytes_is_what_a_loop_holds_and_a_loaded_loop_reruns_alike():
    """The chain sizes its memory check by LoopSpec.nbytes, and reuses one loop for every batch of a key."""
    spec = LoopSpec.of((2, 3, 8, 8), num_steps=5, all_bricks=(0,), **CHURN)
    loop = SamplingLoop(spec)
    held = [loop.latents, loop.x, loop.x_hat, loop.denoised, loop.d_cur, loop.noise, loop.sigmas]
    assert spec.nbytes() == sum(t.numel() * t.element_size() for t in held)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(spec.shape, generator=g)

    def draws():
        gen = torch.Generator().manual_seed(1)
        return lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype)

    runs = []
    for _ in range(2):
        loop.load(latents, draws())
        runs.append(loop.run(lambda x, s, a: 0.5 * x).clone())
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
