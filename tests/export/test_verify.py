"""The one verification loop, driven by fake runners: every way a file can fail names engine, runtime and shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.errors import VerificationError
from export.records import MeasuredError
from export.specs import engine_specs
from export.verify import TOLERANCES, EngineRunner, eager_output, verify_engine
from lego_model.model import LegoModel

SHAPES = [(1, 1, 1), (2, 1, 1)]  # the embedder's: batch only


@pytest.fixture
def embedder(tiny_model: LegoModel):
    return engine_specs(tiny_model.config)[0]


def _runner(run) -> EngineRunner:
    return EngineRunner("fake-runtime", run)


def test_exact_runner_gives_zero_error_per_shape(tiny_model: LegoModel, embedder) -> None:
    seen: list[tuple[int, ...]] = []

    def exact(inputs: dict[str, torch.Tensor]) -> np.ndarray:
        seen.append(tuple(inputs["c_noise"].shape))
        return eager_output(embedder, tiny_model, inputs)

    result = verify_engine(embedder, tiny_model, _runner(exact), "fp16", SHAPES)
    assert seen == [(1,), (2,)]
    assert result.runtime == "fake-runtime" and result.tolerance == TOLERANCES["fp16"]
    assert result.shapes == {"1x1x1": MeasuredError(0.0, 0.0), "2x1x1": MeasuredError(0.0, 0.0)}
    assert result.max_abs == 0.0 and result.max_rel == 0.0


def test_worst_shape_is_recorded(tiny_model: LegoModel, embedder) -> None:
    def off_at_batch_2(inputs: dict[str, torch.Tensor]) -> np.ndarray:
        out = eager_output(embedder, tiny_model, inputs)
        return out * (1 + 1e-5) if len(out) == 2 else out

    result = verify_engine(embedder, tiny_model, _runner(off_at_batch_2), "fp32", SHAPES)
    assert result.shapes["1x1x1"].max_rel == 0.0 and result.shapes["2x1x1"].max_rel > 0
    assert result.max_rel == result.shapes["2x1x1"].max_rel


@pytest.mark.parametrize(
    ("run", "fragment"),
    [
        (lambda out: out * 1.1, "differs from the eager model at batch 1, 1x1: max |err|"),
        (lambda out: np.full_like(out, np.nan), "differs from the eager model"),
        (lambda out: out[:, :-1], "returns shape [1, 63] at batch 1, 1x1, the eager model [1, 64]"),
    ],
)
def test_bad_outputs_are_refused(tiny_model: LegoModel, embedder, run, fragment: str) -> None:
    runner = _runner(lambda inputs: run(eager_output(embedder, tiny_model, inputs)))
    with pytest.raises(VerificationError) as info:
        verify_engine(embedder, tiny_model, runner, "fp32", SHAPES)
    message = str(info.value)
    assert message.startswith("embedder (fp32, fake-runtime) ") and fragment in message, message
    assert "\n" not in message


def test_runner_failure_names_the_shape(tiny_model: LegoModel, embedder) -> None:
    def fails_at_batch_2(inputs: dict[str, torch.Tensor]) -> np.ndarray:
        if len(inputs["c_noise"]) == 2:
            raise VerificationError("out of memory")
        return eager_output(embedder, tiny_model, inputs)

    with pytest.raises(VerificationError, match=r"^embedder \(fp32, fake-runtime\) cannot run at batch 2, 1x1: out of"):
        verify_engine(embedder, tiny_model, _runner(fails_at_batch_2), "fp32", SHAPES)
