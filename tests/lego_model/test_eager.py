"""lego_model.eager: the reference sampling path's NaN/Inf reports, and the seed list parser."""

from __future__ import annotations

import pytest
import torch

from lego_model import LegoModel, get_config
from lego_model.eager import sample_images
from lego_model.errors import LegoError, NonFiniteError
from lego_model.images import parse_seeds
from lego_model.sampler import StackedRandomGenerator


def test_nan_weights_are_named_with_the_step():
    model = LegoModel(get_config("tiny_PG_16")).randomize_(0).eval()
    with torch.no_grad():
        model.bricks[2].final_layer.linear.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"eager model \(tiny_PG_16, fp32\) produced NaN/Inf at sampling step 0 "
                       r"of 2: its weight model.model.2.final_layer.linear.bias holds NaN/Inf"):  # fmt: skip
        sample_images(model, [0], steps=2)


def test_overflow_with_finite_weights_names_the_suspects():
    model = LegoModel(get_config("tiny_PG_16")).randomize_(0).eval()
    with torch.no_grad():
        model.bricks[2].final_layer.linear.weight.mul_(1e37)  # finite, but its products overflow float32
    with pytest.raises(NonFiniteError, match=r"step 0 of 2: the weights are finite, so float overflowed; suspects: "
                       r"weights of extreme magnitude \(check the checkpoint\), the guidance scale 4"):  # fmt: skip
        sample_images(model, [0], steps=2, classes=1, cfg_scale=4.0)


def test_seed_parsing_and_generator_range():
    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    assert parse_seeds(f"{2**32 - 1}") == [2**32 - 1]
    with pytest.raises(LegoError, match="seed 3 is given more than once"):
        parse_seeds("0-5,3")
    with pytest.raises(LegoError, match="out of range"):
        StackedRandomGenerator([2**32])  # the authors' modulo would give seed 0's image
