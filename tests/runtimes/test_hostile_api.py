"""Issue 21, classes 4, 9, 10 and 11: one model per --out, resumes across backends, NaN/Inf messages that tell
the truth, and the Python API under the CLIs' rules.

Each class is tested with several members, not only the issue's examples: every misuse of the public API
(Generator, Request, BackendOptions, open_backend, lego_model.eager, SkipPlan) raises a LegoError (a UsageError
where it is misuse) with a one-line message, before anything loads or runs.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from export.records import PROFILE_LIMITS
from lego_model import flops
from lego_model.checkpoints import save_checkpoint
from lego_model.configs import MAX_CFG_SCALE, MAX_SIDE, get_config
from lego_model.eager import nonfinite_cause, sample, sample_images
from lego_model.errors import LegoError, NonFiniteError, ShapeError, UsageError
from lego_model.images import MAX_SEEDS
from lego_model.request import Churn, Request
from lego_model.sampler import MAX_BATCH, MAX_S_NOISE, MAX_STEPS, edm_sample
from lego_model.skip import SkipPlan, SkipRule
from runtimes import Generator
from runtimes.backends import BackendOptions, open_backend
from runtimes.backends.precision import cpu_bf16_units
from runtimes.backends.torch_backend import TorchBackend
from runtimes.chain import BrickChain
from runtimes.errors import OutputError
from runtimes.outputs import RunOutputs, run_settings
from runtimes.sample import main
from tests.runtimes.conftest import export_onnx_dir, tiny_model

from .test_hostile_sample import refused, run_cli, snapshot

CFG = get_config("tiny_PG_16")
CORES = flops.usable_cores()


def one_line(err: BaseException) -> str:
    text = str(err)
    assert isinstance(err, LegoError), f"{type(err).__name__}: {text}"
    assert len(text.strip().splitlines()) == 1, text
    return text


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tiny_model("tiny_PG_16"), tmp_path_factory.mktemp("ckpt") / "pg.safetensors")


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory):
    from lego_model import LegoModel

    model = LegoModel(CFG).randomize_(1).eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("other") / "other.safetensors")


# ---------------------------------------------------------------- class 4: one --out, one model

IGNORED = {
    "onnxruntime-cpu, checkpoint": ("onnxruntime-cpu", dict(checkpoint="x.safetensors"), "--checkpoint"),
    "onnxruntime-cpu, config": ("onnxruntime-cpu", dict(config="tiny_PG_16"), "--config"),
    "openvino, checkpoint": ("openvino", dict(checkpoint="x.safetensors"), "--checkpoint"),
    "openvino, device": ("openvino", dict(device="cpu"), "device="),
    "openvino, ort_arena": ("openvino", dict(ort_arena=False), "ort_arena="),
    "openvino, ort_optimization": ("openvino", dict(ort_optimization="basic"), "--ort-optimization"),
}


@pytest.mark.parametrize("name", IGNORED)
def test_an_option_the_backend_would_ignore_is_refused(name, engines_pg):
    backend, options, flag = IGNORED[name]
    if backend == "openvino":
        pytest.importorskip("openvino")
    with pytest.raises(LegoError) as raised:
        open_backend(backend, engine_dir=engines_pg, **options)
    assert f"{flag} does not apply to the {backend} backend" in one_line(raised.value)


@pytest.mark.parametrize("options", [dict(ort_arena=False), dict(ort_optimization="basic")])
def test_the_torch_backend_refuses_onnx_runtime_options(options, ckpt):
    with pytest.raises(LegoError, match="does not apply to the torch backend"):
        Generator.from_checkpoint(ckpt, device="cpu", **options)


@pytest.mark.parametrize("second", ["torch other", "eager other"])
def test_a_resume_with_other_weights_is_refused_and_touches_nothing(second, engines_pg, other_ckpt, tmp_path):
    out = tmp_path / "out"
    common = ["--seeds", "0-1", "--steps", "2", "--out", str(out)]
    assert run_cli("--engine-dir", str(engines_pg), *common).exit_code == 0
    assert json.loads((out / "run.json").read_text())["settings"]["weights"] == "random init seed 0"
    engines = ["--engine-dir", str(engines_pg), "--backend", "torch"] if second == "torch other" else []
    before = snapshot(tmp_path)
    line = refused(run_cli(*engines, "--checkpoint", str(other_ckpt), *common[:1], "0-3", *common[2:], "--resume"),
                   "holds a run with weights random init seed 0")  # fmt: skip
    assert "this run: sha256:" in line
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- class 9: resuming across backends


def test_the_backend_is_recorded_where_its_results_are_its_own():
    request = Request.make(CFG, [0, 1], steps=2)
    backend = TorchBackend(tiny_model("tiny_PG_16"), device="cpu")
    assert backend.shares_results  # fp32
    for precision in ("bf16", "fp16", "int8"):
        backend.precision = precision
        assert not backend.shares_results, precision
    shared = run_settings(request, weights="w", precision="fp32")
    own = run_settings(request, weights="w", precision="bf16", backend="openvino")
    assert "backend" not in shared and own["backend"] == "openvino"


@pytest.mark.parametrize("first, second", [("openvino", "torch"), ("torch", "openvino"), ("tensorrt", "torch")])
def test_a_resume_on_another_backend_of_an_own_precision_is_refused(first, second, tmp_path):
    request = Request.make(CFG, [0, 1], steps=2)
    out = tmp_path / "out"
    recorded = RunOutputs(out, None, run_settings(request, weights="w", precision="bf16", backend=first), first)
    recorded.write_record()
    again = RunOutputs(out, None, run_settings(request, weights="w", precision="bf16", backend=second), second)
    with pytest.raises(OutputError, match=f"holds a run with backend {first} \\(this run: {second}\\)"):
        again.check([0, 1], resume=True, height=16, width=16, channels=3, engine_dir=None)
    same = RunOutputs(out, None, run_settings(request, weights="w", precision="bf16", backend=first), first)
    assert same.check([0, 1], resume=True, height=16, width=16, channels=3, engine_dir=None) == [0, 1]


@pytest.mark.skipif(not cpu_bf16_units(), reason="bf16 runs need a CPU with AMX or AVX512-BF16")
@pytest.mark.parametrize("first, second", [("torch", "openvino"), ("openvino", "torch")])
def test_bf16_resume_across_backends_is_refused_through_the_cli(first, second, engines_pg, tmp_path):
    pytest.importorskip("openvino")
    out = tmp_path / "out"
    common = ["--engine-dir", str(engines_pg), "--precision", "bf16", "--steps", "2", "--out", str(out)]
    assert run_cli(*common, "--backend", first, "--seeds", "0-1").exit_code == 0
    before = snapshot(tmp_path)
    refused(
        run_cli(*common, "--backend", second, "--seeds", "0-3", "--resume"), f"backend {first} (this run: {second})"
    )
    assert snapshot(tmp_path) == before
    assert run_cli(*common, "--backend", first, "--seeds", "0-3", "--resume").exit_code == 0


# ---------------------------------------------------------------- class 10: NaN/Inf told truthfully; no-image churn


@pytest.mark.parametrize("value", [2.5, 1e6, 1e30, -1.0, math.nan, math.inf])
def test_churn_noise_that_makes_no_images_is_refused(value):
    with pytest.raises(UsageError, match="S_noise"):
        Churn(S_churn=1.0, S_noise=value)
    with pytest.raises(UsageError, match="S_noise"):
        Request.make(CFG, [0], S_churn=1.0, S_noise=value)
    with pytest.raises(UsageError, match="S_noise"):
        edm_sample(lambda x, s, a: x, torch.zeros(1, 1, 4, 4, dtype=torch.float64), num_steps=2, S_churn=1.0,
                   S_noise=value, active_per_step=[(0,), (0,)])  # fmt: skip


@pytest.mark.parametrize("value", [0.0, 1.0, 1.007, MAX_S_NOISE])
def test_churn_noise_up_to_the_bound_is_accepted(value):
    assert Churn(S_churn=1.0, S_noise=value).S_noise == value


@pytest.mark.parametrize("value", ["1e30", "2.5", "100"])
def test_the_cli_refuses_the_same_churn_noise(value, engines_pg, tmp_path):
    result = run_cli(
        "--engine-dir", str(engines_pg), "--S-churn", "1", "--S-noise", value, "--out", str(tmp_path / "o")
    )
    refused(result, "'--S-noise'")
    assert not (tmp_path / "o").exists()


def test_nonfinite_cause_is_one_wording_for_every_source_of_weights():
    finite = [("w", np.ones(3, np.float32)), ("q", np.ones(3, np.int8))]
    broken = [("w", np.ones(3, np.float32)), ("bad.bias", np.array([1.0, np.nan], np.float32))]
    module = torch.nn.Linear(2, 2)
    common = dict(cfg_scale=None, churn=False)
    assert nonfinite_cause(finite, **common).startswith("the weights are finite, so float overflowed")
    assert nonfinite_cause(broken, **common).startswith("its weight bad.bias holds NaN/Inf")
    assert nonfinite_cause(module, **common).startswith("the weights are finite, so float overflowed")
    with torch.no_grad():
        module.bias.fill_(math.inf)
    assert nonfinite_cause(module, **common).startswith("its weight bias holds NaN/Inf")
    assert nonfinite_cause(None, **common).startswith("its weights could not be read here")
    fp16 = nonfinite_cause(finite, **common, precision="fp16")
    assert "suspects: fp16's range" in fp16 and "skip that brick" in fp16
    embedder = nonfinite_cause(finite, cfg_scale=4.0, churn=True, reads_image=False)
    assert "guidance" not in embedder and "churn" not in embedder  # its inputs are finite whatever the request


def test_engine_reports_read_the_engine_files_weights(engines_pg, tmp_path):
    model = tiny_model("tiny_PR_16")
    with torch.no_grad():
        model.bricks[1].final_layer.linear.bias.fill_(math.nan)
    broken = export_onnx_dir(model, tmp_path / "nan")
    backend, _ = open_backend("onnxruntime-cpu", engine_dir=engines_pg, threads=1)
    line = BrickChain(backend)._nonfinite_message(2, "sampling step 0 of 3")
    assert line.startswith("brick 1 (onnxruntime-cpu, fp32) produced NaN/Inf at sampling step 0 of 3: the weights are")
    backend.precision = "bf16"  # what computed is what the message names (OpenVINO's bf16, not its files' fp32)
    assert "(onnxruntime-cpu, bf16)" in BrickChain(backend)._nonfinite_message(2, "sampling step 0 of 3")
    backend, _ = open_backend("onnxruntime-cpu", engine_dir=broken, threads=1)
    assert "holds NaN/Inf" in BrickChain(backend)._nonfinite_message(2, "x") and "likely" not in line


def test_eager_and_torch_backend_reports_give_the_same_cause(tmp_path):
    model = tiny_model("tiny_PG_16")
    with torch.no_grad():
        model.bricks[2].final_layer.linear.weight.mul_(1e37)  # finite, but its products overflow float32
    with pytest.raises(NonFiniteError) as eager:
        sample_images(model, [0], steps=2)
    with pytest.raises(NonFiniteError) as runtime:
        Generator.from_checkpoint(model, device="cpu").generate([0], steps=2)
    cause = str(eager.value).split(": ", 1)[1]
    assert cause.startswith("the weights are finite, so float overflowed") and str(runtime.value).endswith(cause)
    assert str(eager.value).startswith("the eager model (tiny_PG_16, fp32) produced NaN/Inf at sampling step 0 of 2")


@pytest.mark.skipif(not cpu_bf16_units(), reason="bf16 runs need a CPU with AMX or AVX512-BF16")
def test_openvino_bf16_names_the_precision_that_computed(tmp_path):
    pytest.importorskip("openvino")
    model = tiny_model("tiny_PR_16")
    with torch.no_grad():
        model.bricks[1].final_layer.linear.bias.fill_(math.nan)
    engines = export_onnx_dir(model, tmp_path / "nan")
    for precision in ("bf16", "auto"):
        args = ["--engine-dir", str(engines), "--backend", "openvino", "--precision", precision, "--seeds", "0"]
        line = refused(run_cli(*args, "--steps", "2", "--out", str(tmp_path / "o")), "(openvino, bf16)")
        assert "holds NaN/Inf" in line and "fp32" not in line


# ---------------------------------------------------------------- class 11: the Python API keeps the CLIs' rules


def _gen(ckpt):
    return Generator.from_checkpoint(ckpt, device="cpu")


def _borrower_after_owner_closed(ckpt):
    owner = _gen(ckpt)
    borrower = Generator(owner.backend)
    owner.generate([0], steps=1)  # loads the backend: the owner's
    borrower.generate([0], steps=1)  # finds it loaded: borrowed
    owner.close()
    borrower.generate([0], steps=1)


MISUSE = {
    # generate's request keywords: Request.make, the one validation path
    "plan=123": (lambda c: _gen(c).generate([0], plan=123), "plan: pass a SkipPlan"),
    "plan with a superscript": (lambda c: _gen(c).generate([0], plan="\u00b2@0:1"), "is not a brick index"),
    "plan of a number in a list": (lambda c: _gen(c).generate([0], plan=["global", 5]), "plan: pass a SkipPlan"),
    "on_step not callable": (lambda c: _gen(c).generate([0], steps=2, on_step="x"), "on_step must be a callable"),
    "batches on_step not callable": (
        lambda c: (g := _gen(c)).batches(g.request([0], steps=2), on_step=5),
        "on_step must be a callable",
    ),
    "batches of no request": (lambda c: _gen(c).batches("x"), "expected a Request"),
    "unknown keyword to generate": (lambda c: _gen(c).generate([0], foo=1), "unexpected keyword argument 'foo'"),
    "unknown keyword to Request.make": (lambda c: Request.make(CFG, [0], foo=1), "unexpected keyword argument"),
    "unknown keyword to sample_images": (
        lambda c: sample_images(tiny_model("tiny_PG_16"), [0], foo=1),
        "unexpected keyword argument",
    ),
    "too many seeds": (lambda c: Request.make(CFG, range(MAX_SEEDS + 1)), f"limit of {MAX_SEEDS}"),
    "batch beyond the CLI's": (lambda c: Request.make(CFG, [0], batch=MAX_BATCH + 1), f"1..{MAX_BATCH}"),
    "side beyond the CLI's": (lambda c: Request.make(CFG, [0], size=MAX_SIDE + 16), f"at most {MAX_SIDE}"),
    "steps beyond the CLI's": (lambda c: Request.make(CFG, [0], steps=MAX_STEPS + 1), f"1..{MAX_STEPS}"),
    "guidance beyond the CLI's": (lambda c: Request.make(CFG, [0], cfg_scale=MAX_CFG_SCALE * 2), "outside 0..100"),
    "churn noise beyond the CLI's": (lambda c: Request.make(CFG, [0], S_churn=1, S_noise=1e30), "S_noise"),
    # backend options: BackendOptions, the one place
    "threads as text": (lambda c: Generator.from_checkpoint(c, threads="2"), "threads (--threads): expected an int"),
    "threads -1": (lambda c: Generator.from_checkpoint(c, threads=-1), f"outside 1..{CORES}"),
    "threads beyond the cores": (lambda c: Generator.from_checkpoint(c, threads=CORES + 1), f"outside 1..{CORES}"),
    "threads 10**6": (lambda c: Generator.from_checkpoint(c, threads=10**6), f"outside 1..{CORES}"),
    "threads 2.5": (lambda c: Generator.from_checkpoint(c, threads=2.5), "expected an int"),
    "threads True": (lambda c: BackendOptions(threads=True), "expected an int"),
    "unknown option": (lambda c: Generator.from_checkpoint(c, bogus=1), "unexpected keyword argument 'bogus'"),
    "unknown option to BackendOptions": (lambda c: BackendOptions(bogus=1), "BackendOptions: got an unexpected"),
    "unknown precision": (lambda c: BackendOptions(precision="fp64"), "precision: expected one of"),
    "unknown ort_optimization": (lambda c: BackendOptions(ort_optimization="max"), "ort_optimization: expected"),
    "ort_arena as text": (lambda c: BackendOptions(ort_arena="no"), "ort_arena: expected True or False"),
    "random_init as text": (lambda c: Generator.from_checkpoint(config="tiny_PG_16", random_init="yes"), "random_init"),
    "negative local_rank": (lambda c: BackendOptions(local_rank=-1), "local_rank"),
    "device of another kind": (lambda c: Generator.from_checkpoint(c, device="tpu"), "runs on 'cpu' or 'cuda[:N]'"),
    "device as a number": (lambda c: Generator.from_checkpoint(c, device=5), "device: expected"),
    "device with a bad index": (lambda c: Generator.from_checkpoint(c, device="cpu:x"), "runs on 'cpu'"),
    "checkpoint as a number": (lambda c: Generator.from_checkpoint(123), "checkpoint: expected a file path"),
    "engine_dir as a number": (lambda c: Generator.from_engine_dir(123), "engine_dir: expected a directory path"),
    "too many positional arguments": (lambda c: Generator.from_checkpoint(c, "cpu"), "too many positional"),
    # the generator and chain
    "a backend that is a string": (lambda c: Generator("backend"), "backend: expected a runtimes Backend"),
    "max_buffer_sets as text": (
        lambda c: Generator.from_checkpoint(c, max_buffer_sets="8"),
        "max_buffer_sets must be an int",
    ),
    "cuda_graphs as text": (lambda c: Generator.from_checkpoint(c, cuda_graphs="yes"), "cuda_graphs: expected"),
    "decode on a pixel model": (lambda c: _gen(c).decode(torch.zeros(1, 3, 16, 16)), "decode is for latent models"),
    # the eager model
    "eager sample of no model": (lambda c: sample("x", Request.make(CFG, [0])), "model: expected a LegoModel"),
    "eager sample of no request": (lambda c: sample(tiny_model("tiny_PG_16"), "x"), "request: expected a Request"),
    "eager sample_images of None": (lambda c: sample_images(None, [0]), "model: expected a LegoModel"),
    # skip plans, built directly
    "SkipPlan of text bricks": (lambda c: SkipPlan("3"), "num_bricks: expected an int"),
    "SkipPlan of no bricks": (lambda c: SkipPlan(0), "num_bricks"),
    "SkipPlan of text rules": (lambda c: SkipPlan(3, ("x",)), "rules: expected a tuple of SkipRule"),
    "SkipPlan with a missing brick": (lambda c: SkipPlan(3, (SkipRule((5,), 0.0, 1.0),)), "brick 5 does not exist"),
    "SkipRule of text bricks": (lambda c: SkipRule("x", 0.0, 1.0), "bricks: expected"),
    "SkipRule of a NaN start": (lambda c: SkipRule((0,), math.nan, 1.0), "start: expected a fraction"),
    "SkipRule backwards": (lambda c: SkipRule((0,), 0.8, 0.2), "must be below stop"),
    "SkipPlan plus a number": (lambda c: SkipPlan(3) + 5, "adds only another"),
    "SkipPlan plus another brick count": (lambda c: SkipPlan(3) + SkipPlan(2), "adds only another"),
    "SkipPlan.parse unknown keyword": (lambda c: SkipPlan.parse("2@0:1", CFG, strict=True), "unexpected keyword"),
    "uint8 of a latent model from the eager model": (
        lambda c: sample_images(tiny_model("tiny_latent_PG_8"), [0], steps=1, output="uint8"),
        "decoding them is the caller's",
    ),
    "on_step of no argument": (lambda c: _gen(c).generate([0], steps=2, on_step=lambda: None), "must take one"),
    "a borrowed backend its owner closed": (lambda c: _borrower_after_owner_closed(c), "closed by the one that loaded"),
    "max_batch of a text cap": (lambda c: _gen(c).max_batch(cap="x"), "cap: expected an int >= 1"),
    "max_batch of no images": (lambda c: _gen(c).max_batch(cap=0), "cap: expected an int >= 1"),
    "only of a number": (lambda c: Request.make(CFG, [0, 1]).only(5), "only: expected an iterable"),
    "only of a seed twice": (lambda c: Request.make(CFG, [0, 1]).only([0, 0]), "seed 0 is given twice"),
    "only of a float seed": (lambda c: Request.make(CFG, [0, 1]).only([0.0]), "is not one of this request's seeds"),
    # an unset setting must not open the shipped model's eager backend instead of the user's engines
    "from_engine_dir of None": (lambda c: Generator.from_engine_dir(None), "got NoneType; Generator.from_checkpoint()"),
    "from_checkpoint of a model and another config": (
        lambda c: Generator.from_checkpoint(tiny_model("tiny_PG_16"), device="cpu", config="lego_S_PG_64"),
        "names another model than the LegoModel given",
    ),
    "Generator with an unknown keyword": (
        lambda c: Generator(_gen(c).backend, max_buffers=4),
        "unexpected keyword argument 'max_buffers'",
    ),
}


@pytest.mark.parametrize("name", MISUSE)
def test_api_misuse_raises_the_projects_error_in_one_line(name, ckpt):
    call, fragment = MISUSE[name]
    with pytest.raises(Exception) as raised:
        call(ckpt)
    assert fragment in one_line(raised.value), str(raised.value)


def test_the_cli_and_the_api_check_the_same_bounds():
    params = {p.name: p.type for p in main.params}
    assert (params["batch"].max, params["steps"].max) == (MAX_BATCH, MAX_STEPS)
    assert PROFILE_LIMITS["batch"] is MAX_BATCH and PROFILE_LIMITS["height"] is MAX_SIDE
    assert (params["height"].max, params["width"].max) == (MAX_SIDE, MAX_SIDE)
    assert (params["S_noise"].max, params["cfg_scale"].max) == (MAX_S_NOISE, MAX_CFG_SCALE)
    assert params["threads"].max == CORES


def test_the_eager_model_refuses_a_batch_that_cannot_fit_as_the_generator_does(ckpt, monkeypatch):
    monkeypatch.setattr(flops, "available_memory", lambda: 1 << 20)  # 1 MiB: any 64-seed 64x64 batch is beyond it
    model = tiny_model("tiny_PG_16")
    with pytest.raises(ShapeError) as eager:
        sample_images(model, range(64), size=64, steps=2)
    with pytest.raises(ShapeError) as runtime:
        Generator.from_checkpoint(model, device="cpu").generate(range(64), size=64, steps=2, batch=64)
    assert str(eager.value) == str(runtime.value)
    assert str(eager.value).startswith("64 canvases of 64x64 need at least")


def test_good_api_calls_still_run(ckpt, engines_pg):
    images = _gen(ckpt).generate(np.arange(2), steps=np.int64(2), classes=np.int32(1), plan="global@0.5", size=16)
    assert images.shape == (2, 3, 16, 16)
    with Generator.from_engine_dir(engines_pg, "onnxruntime-cpu", threads=1) as gen:
        assert gen.generate(range(3), steps=2, size=(16, 32)).shape == (3, 3, 16, 32)
    assert SkipPlan(3, (SkipRule((np.int64(2), 0), 0, 1),)).rules[0].bricks == (0, 2)


def test_refused_api_calls_leave_a_copy_of_the_engines_alone(engines_pg, tmp_path):
    engines = tmp_path / "engines"
    shutil.copytree(engines_pg, engines)
    before = snapshot(engines)
    for options in (dict(threads="2"), dict(checkpoint="x"), dict(bogus=1), dict(precision="fp64")):
        with pytest.raises(LegoError):
            Generator.from_engine_dir(engines, "onnxruntime-cpu", **options)
    assert snapshot(engines) == before


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99999999999 bytes."),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB"),
    ],
)
def test_an_allocator_refusal_past_the_memory_estimate_is_a_shape_error(error):
    from contextlib import nullcontext

    from lego_model.request import sample_batches

    def allocating(*args, **kwargs):
        raise error

    batches = sample_batches(Request.make(CFG, range(3), steps=2), lambda labels, n: nullcontext(None),
                             device=torch.device("cpu"), default_batch=3, sampler=allocating)  # fmt: skip
    with pytest.raises(ShapeError) as raised:
        next(batches)
    assert one_line(raised.value).startswith("3 canvases of 16x16 ran out of memory on cpu (")


def test_other_runtime_errors_of_the_sampler_are_not_taken_for_memory():
    from contextlib import nullcontext

    from lego_model.request import sample_batches

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    batches = sample_batches(Request.make(CFG, [0], steps=2), lambda labels, n: nullcontext(None),
                             device=torch.device("cpu"), default_batch=1, sampler=broken)  # fmt: skip
    with pytest.raises(RuntimeError, match="a bug"):
        next(batches)
