"""Eager sampling with the reference model: the path every engine backend is compared with.

:func:`sample` runs a :class:`lego_model.request.Request` through the one
sampling loop (:func:`lego_model.request.sample_batches`) with the model's own
forward as the denoiser; :func:`sample_images` is its keyword form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lego_model.errors import NonFiniteError, UsageError
from lego_model.model import LegoModel
from lego_model.request import Request, sample_batches
from lego_model.sampler import Denoiser, NonFiniteWatch, step_of_call


def nonfinite_weight(module: nn.Module) -> str | None:
    """Name of the first parameter or buffer of ``module`` holding NaN/Inf, or None (one pass over the weights)."""
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                return name
    return None


def sample(model: LegoModel, request: Request, on_step: Callable[[int], None] | None = None) -> Tensor:
    """The request's images (float64 [N, C, H, W] in [-1, 1]; a latent model's latents) from the eager model.

    Without ``request.batch`` every seed runs in one batch.  Runs under
    ``torch.no_grad()`` (not inference mode, whose tensors cannot enter a
    later autograd computation), whatever the caller's grad mode.  A denoiser
    output holding NaN/Inf raises :class:`NonFiniteError` naming the sampling
    step (recorded on the device, read once per batch, as the runtime chain
    does).  Decoding a latent model's latents is the caller's
    (:meth:`lego_model.vae.Vae.decode`).
    """
    if request.config != model.config:
        raise UsageError(
            f"the request was built for {request.config.name}, this model is {model.config.name}; "
            "build it with Request.make(model.config, ...)"
        )
    device = next(model.parameters()).device
    batches = sample_batches(
        request, _eager_batch(model, request), device=device, default_batch=len(request.seeds), on_step=on_step
    )
    with torch.no_grad():
        return torch.cat([images for _, images in batches])


def sample_images(model: LegoModel, seeds: int | Iterable[int], **request: Any) -> Tensor:
    """Keyword form of :func:`sample`: ``Request.make(model.config, seeds, **request)``, then sample it.

    Takes :meth:`Request.make`'s keywords (classes, size, plan, cfg_scale,
    steps, solver, S_churn..., batch).
    """
    return sample(model, Request.make(model.config, seeds, **request))


def _eager_batch(model: LegoModel, request: Request):
    """open_batch for the eager model: its forward under guidance, NaN/Inf watched and reported at block exit."""

    @contextmanager
    def open_batch(labels: Tensor | None, batch: int) -> Iterator[Denoiser]:
        watch = NonFiniteWatch(1, next(model.parameters()).device)
        if labels is not None:
            labels = labels.to(next(model.parameters()).device)

        def denoise(x: Tensor, sigma: Tensor, active: tuple[int, ...]) -> Tensor:
            d = model(x, sigma, labels, active, request.cfg_scale)
            watch.next_call()
            watch.record(0, d)
            return d

        yield denoise
        found = watch.first()
        if found is not None:
            raise NonFiniteError(_nonfinite_message(model, request, found[0]))

    return open_batch


def _nonfinite_message(model: LegoModel, request: Request, call: int) -> str:
    step = step_of_call(call, request.steps, request.solver)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    head = f"the eager model ({model.config.name}, {dtype}) produced NaN/Inf at sampling step {step} of {request.steps}"
    return f"{head}: {nonfinite_cause(model, cfg_scale=request.cfg_scale, churn=request.churn.on)}"


def nonfinite_cause(model: nn.Module, *, cfg_scale: float | None, churn: bool) -> str:
    """Why a model's output went NaN/Inf, as far as its weights tell: a broken weight (by name), or, with
    every weight finite, a float overflow and what can drive one (one pass over the weights)."""
    weight = nonfinite_weight(model)
    if weight is not None:
        return f"its weight {weight} holds NaN/Inf; the checkpoint is damaged, use another one"
    suspects = ["weights of extreme magnitude (check the checkpoint)"]
    if cfg_scale is not None and cfg_scale > 1:
        suspects.append(f"the guidance scale {cfg_scale:g} (lower --cfg-scale)")
    if churn:
        suspects.append("the churn settings")
    return f"the weights are finite, so float overflowed; suspects: {', '.join(suspects)}"
