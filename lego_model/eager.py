"""Eager sampling with the reference model: the path every engine backend is compared with.

:func:`sample` runs a :class:`lego_model.request.Request` through the one
sampling loop (:func:`lego_model.request.sample_batches`) with the model's own
forward as the denoiser; :func:`sample_images` is its keyword form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lego_model.errors import NonFiniteError, UsageError, checked_arguments
from lego_model.images import as_output
from lego_model.model import LegoModel
from lego_model.request import Request, concat_batches, sample_batches
from lego_model.sampler import Denoiser, NonFiniteWatch, step_of_call


def nonfinite_weight(weights: nn.Module | Iterable[tuple[str, Any]]) -> str | None:
    """Name of the first floating-point weight holding NaN/Inf, or None (one pass): of a module's parameters and
    buffers, or of (name, tensor or numpy array) pairs (an engine file's initializers)."""
    named = [*weights.named_parameters(), *weights.named_buffers()] if isinstance(weights, nn.Module) else weights
    with torch.no_grad():
        for name, tensor in named:
            if isinstance(tensor, Tensor):
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    return name
            elif np.issubdtype(tensor.dtype, np.floating) and not np.isfinite(tensor).all():
                return name
    return None


@checked_arguments
def sample(
    model: LegoModel, request: Request, on_step: Callable[[int], None] | None = None
) -> Tensor | np.ndarray | list[Any]:
    """The request's images from the eager model, as its ``output`` asks: float64 [N, C, H, W] in [-1, 1]
    ("tensor"), uint8 NHWC ("uint8") or PIL images ("pil"); a latent model's latents ("tensor", "latents").

    Without ``request.batch`` every seed runs in one batch.  Runs under
    ``torch.no_grad()`` (not inference mode, whose tensors cannot enter a
    later autograd computation), whatever the caller's grad mode.  A denoiser
    output holding NaN/Inf raises :class:`NonFiniteError` naming the sampling
    step (recorded on the device, read once per batch, as the runtime chain
    does).  Decoding a latent model's latents is the caller's
    (:meth:`lego_model.vae.Vae.decode`).
    """
    if not isinstance(model, LegoModel):
        raise UsageError(f"model: expected a LegoModel (load_checkpoint(path)), got {type(model).__name__}")
    if not isinstance(request, Request):
        raise UsageError(
            f"request: expected a Request (Request.make(model.config, seeds, ...)), got {type(request).__name__}"
        )
    if request.config != model.config:
        raise UsageError(
            f"the request was built for {request.config.name}, this model is {model.config.name}; "
            "build it with Request.make(model.config, ...)"
        )
    if model.config.is_latent and request.output not in ("tensor", "latents"):
        raise UsageError(
            f"output={request.output!r}: the eager model samples {model.config.name}'s latents, decoding them is the "
            "caller's (lego_model.vae); ask output='latents', or use runtimes.Generator (vae=PATH) for images"
        )
    device = next(model.parameters()).device
    if device.type == "cpu":  # the activations a batch needs, refused up front as the Generator does
        request.check_memory(len(request.seeds))
    elif device.type == "cuda":
        request.check_memory(len(request.seeds), available=torch.cuda.mem_get_info(device)[0], where=f" on {device}")
    batches = sample_batches(
        request, _eager_batch(model, request), device=device, default_batch=len(request.seeds), on_step=on_step
    )
    with torch.no_grad():
        return as_output(concat_batches(request, batches, device), request.output)


@checked_arguments
def sample_images(model: LegoModel, seeds: int | Iterable[int], **request: Any) -> Tensor | np.ndarray | list[Any]:
    """Keyword form of :func:`sample`: ``Request.make(model.config, seeds, **request)``, then sample it.

    Takes :meth:`Request.make`'s keywords (classes, size, plan, cfg_scale,
    steps, solver, S_churn..., batch, output).
    """
    if not isinstance(model, LegoModel):
        raise UsageError(f"model: expected a LegoModel (load_checkpoint(path)), got {type(model).__name__}")
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
    precision = DTYPE_PRECISIONS.get(next(model.parameters()).dtype, str(next(model.parameters()).dtype))
    cause = nonfinite_cause(model, cfg_scale=request.cfg_scale, churn=request.churn.on, precision=precision)
    return nonfinite_message(
        "the eager model", model.config.name, precision, f"sampling step {step} of {request.steps}", cause
    )


# The names the messages and records give a weight dtype (the backends' precision names).
DTYPE_PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def nonfinite_message(what: str, runner: str, precision: str, where: str, cause: str) -> str:
    """The one wording of a NaN/Inf report, for the eager model and every backend's chain:
    ``brick 1 (openvino, bf16) produced NaN/Inf at sampling step 0 of 3: <cause>``.

    ``precision`` is the one that computed (a backend's run precision, not its files').
    """
    return f"{what} ({runner}, {precision}) produced NaN/Inf at {where}: {cause}"


def nonfinite_cause(
    weights: nn.Module | Iterable[tuple[str, Any]] | None,
    *,
    cfg_scale: float | None,
    churn: bool,
    precision: str = "fp32",
    reads_image: bool = True,
) -> str:
    """Why an output went NaN/Inf, as far as the weights that computed it tell (one pass over them).

    ``weights``: a module, (name, tensor or array) pairs (an engine file's
    initializers), or None where they cannot be read (a TensorRT plan).  A
    weight holding NaN/Inf is named; with every weight finite the cause is a
    float overflow, and what can drive one is listed (fp16's range first);
    unread weights leave both causes open.  ``reads_image`` False for the
    embedder, whose inputs (noise level, class) are finite whatever the request.
    """
    suspects = []
    if precision == "fp16":
        suspects.append(
            "fp16's range (re-export with --precision fp32 or bf16" + (", or skip that brick)" if reads_image else ")")
        )
    suspects.append("weights of extreme magnitude (check the checkpoint)")
    if reads_image and cfg_scale is not None and cfg_scale > 1:
        suspects.append(f"the guidance scale {cfg_scale:g} (lower --cfg-scale)")
    if reads_image and churn:
        suspects.append("the churn settings")
    if weights is None:
        return (
            "its weights could not be read here: they hold NaN/Inf (re-export from a sound checkpoint), or float "
            f"overflowed; suspects: {', '.join(suspects)}"
        )
    weight = nonfinite_weight(weights)
    if weight is not None:
        return f"its weight {weight} holds NaN/Inf; the checkpoint is damaged: use (or re-export from) a sound one"
    return f"the weights are finite, so float overflowed; suspects: {', '.join(suspects)}"
