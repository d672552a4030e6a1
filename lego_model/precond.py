"""EDM preconditioning, canvas coordinates, guidance and the brick chain.

One denoiser call D(x; sigma, y) with active bricks A (shared/DESIGN.md):

    cond = embed(c_noise(sigma), y)
    x_in = concat(c_in(sigma) * x, coords)
    f = 0;  for k in A: f = brick_k(x_in, f, cond)
    D = c_skip(sigma) * x + c_out(sigma) * f

The call is written once, in two halves around the engines: :func:`prepare_inputs`
(x_in, c_noise; rows [cond; null] under guidance), :func:`engine_labels`, and
:func:`combine_output` (guidance, then D).  Each has a form that allocates its
result (eager model, training, export sample inputs) and an ``out=`` form that
writes into static buffers (the runtime chain, CUDA graphs); both run the same
float32 operations in the same order, so they agree to the bit.

The preconditioning is Karras et al. 2022 (EDM), Table 1, with sigma_data = 0.5.
Everything here is float32, as in the authors' EDMPrecondLEGO.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lego_model.configs import LegoConfig, refuse_unconditional
from lego_model.errors import ShapeError


def edm_scalings(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) for sigma of shape [B]; the first three come back as [B, 1, 1, 1]."""
    # The authors' float32 expressions (c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2),
    # c_in = 1 / sqrt(sd^2 + s^2), c_noise = ln(s) / 4) with the shared s^2 + sd^2 and its root computed once, and
    # torch's `scalar / tensor` (reciprocal, then times the scalar) called without its Python wrapper: the same
    # operations on the same values, so the same bits (tests/lego_model/test_model.py checks a sweep of sigmas),
    # in 9 tensor operations instead of 17 -- this runs in every denoiser call, where the shipped model's whole
    # call on the CPU takes about a millisecond at batch 1.
    s = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
    d = s * s + sigma_data**2  # torch computes s**2 as s * s
    root = d.sqrt()
    c_skip = torch.mul(d.reciprocal(), sigma_data**2)
    c_out = torch.div(s * sigma_data, root)
    c_in = root.reciprocal()  # 1 / root is root.reciprocal() * 1
    c_noise = torch.div(s.log().flatten(), 4)
    return c_skip, c_out, c_in, c_noise


def canvas_coords(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Two channels in [-1, 1] over the whole canvas, row coordinate first: shape (1, 2, H, W).

    For square canvases this is the authors' layout; they normalise by (side - 1),
    so a side of 1 pixel is not allowed.
    """
    # (i / (n - 1) - 0.5) * 2, in the authors' order of operations, so that the float32 values agree bit for bit.
    rows = (torch.arange(height, dtype=torch.float32, device=device) / (height - 1) - 0.5) * 2
    cols = (torch.arange(width, dtype=torch.float32, device=device) / (width - 1) - 0.5) * 2
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))  # (2, H, W)
    return grid.unsqueeze(0)


def model_input(x: Tensor, c_in: Tensor, coords: Tensor) -> Tensor:
    """x_in = concat(c_in * x, coords): (B, C+2, H, W) in float32."""
    scaled = c_in * x.to(torch.float32)
    return torch.cat([scaled, coords.expand(x.shape[0], -1, -1, -1)], dim=1)


@dataclass
class CallInputs:
    """The engine inputs of one denoiser call and the scalings that turn the bricks' output into D.

    Rows of ``x_in`` and ``c_noise`` are [cond; null] under guidance, twice the
    batch.  :func:`prepare_inputs` makes it; the runtime chain allocates one per
    (batch, H, W, guidance) with :meth:`allocate` and refills it in place.
    """

    x32: Tensor  # (B, C, H, W) float32: x as the preconditioning reads it
    x_in: Tensor  # (rows, C+2, H, W): concat(c_in * x, coords)
    c_noise: Tensor  # (rows,)
    c_skip: Tensor  # (B, 1, 1, 1)
    c_out: Tensor  # (B, 1, 1, 1)
    scratch: Tensor | None = None  # (B, C, H, W) float32, for combine_output's out= form

    @classmethod
    def allocate(
        cls,
        batch: int,
        channels: int,
        height: int,
        width: int,
        *,
        guided: bool,
        device: torch.device | str | None = None,
        x_in_dtype: torch.dtype = torch.float32,
        c_noise_dtype: torch.dtype = torch.float32,
    ) -> CallInputs:
        """Static buffers for calls at this shape; the coordinate channels of ``x_in`` are written here, once."""
        rows = 2 * batch if guided else batch
        image = (batch, channels, height, width)
        x_in = torch.empty(rows, channels + 2, height, width, dtype=x_in_dtype, device=device)
        x_in[:, channels:] = canvas_coords(height, width, device=device)
        return cls(
            x32=torch.empty(image, dtype=torch.float32, device=device),
            x_in=x_in,
            c_noise=torch.empty(rows, dtype=c_noise_dtype, device=device),
            c_skip=torch.empty(batch, 1, 1, 1, dtype=torch.float32, device=device),
            c_out=torch.empty(batch, 1, 1, 1, dtype=torch.float32, device=device),
            scratch=torch.empty(image, dtype=torch.float32, device=device),
        )

    @property
    def guided(self) -> bool:
        return self.x_in.shape[0] != self.x32.shape[0]


def prepare_inputs(
    x: Tensor, sigma: Tensor, *, sigma_data: float, guided: bool, out: CallInputs | None = None
) -> CallInputs:
    """First half of a denoiser call: x_in = concat(c_in * x, coords) and c_noise for the engines.

    x: (B, C, H, W) any float dtype; sigma: (B,).  Under guidance the rows are
    doubled to [cond; null] (both halves see the same x and sigma).  Without
    ``out`` the result is freshly allocated (and differentiable, for training);
    with ``out`` (:meth:`CallInputs.allocate`) it is written into those buffers,
    so that nothing image-sized is allocated and a CUDA graph can capture the
    call.  Both forms compute in float32 in the same order (EDM, Table 1), so
    they agree to the bit.
    """
    B, C, H, W = x.shape
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sigma_data)  # [B]-sized
    if out is None:
        x32 = x.to(torch.float32)
        x_in = torch.cat([c_in * x32, canvas_coords(H, W, device=x.device).expand(B, -1, -1, -1)], dim=1)
        if guided:
            x_in, c_noise = torch.cat([x_in, x_in]), torch.cat([c_noise, c_noise])
        return CallInputs(x32=x32, x_in=x_in, c_noise=c_noise, c_skip=c_skip, c_out=c_out)
    assert out.guided == guided and tuple(out.x32.shape) == (B, C, H, W), "buffers of another shape"
    out.x32.copy_(x)
    out.c_skip.copy_(c_skip)
    out.c_out.copy_(c_out)
    torch.mul(c_in, out.x32, out=out.x_in[:B, :C])  # the coordinate channels were written by allocate()
    out.c_noise[:B].copy_(c_noise)
    if guided:
        out.x_in[B:, :C].copy_(out.x_in[:B, :C])
        out.c_noise[B:].copy_(c_noise)
    return out


def engine_labels(
    class_labels: Tensor | None,
    batch: int,
    config: LegoConfig,
    *,
    guided: bool,
    device: torch.device | str | None = None,
    out: Tensor | None = None,
) -> Tensor | None:
    """The embedder's label rows: one-hot [B, label_dim] (None: the null label), [cond; null] under guidance.

    None for an unconditional model, which refuses labels (and guidance, see
    ``LegoConfig.check_guidance``).  With ``out`` ([rows, label_dim]) the rows are written there.
    """
    if not config.label_dim:
        if class_labels is not None:
            refuse_unconditional(config.name, config.label_dim, "class labels")
        assert not guided, "guidance on an unconditional model: call config.check_guidance first"
        return None
    rows = 2 * batch if guided else batch
    if out is None:
        out = torch.empty(rows, config.label_dim, dtype=torch.float32, device=device)
    if class_labels is None:
        out[:batch].zero_()
    else:
        out[:batch].copy_(class_labels)
    if guided:
        out[batch:].zero_()  # the null label is the all-zero vector
    return out


def combine_output(
    inputs: CallInputs, f: Tensor, cfg_scale: float | Tensor | None = None, *, out: Tensor | None = None
) -> Tensor:
    """Second half of a denoiser call: guidance on f, then D = c_skip * x + c_out * f, float32.

    ``f`` is the last active brick's output, rows [cond; null] under guidance:
    f = f_null + s * (f_cond - f_null), as the authors' forward_with_cfg.
    ``cfg_scale`` may be a 0-dim tensor, so that a captured CUDA graph reads
    the scale of the current run.  Without ``out`` the result is freshly
    allocated (and differentiable, for training); with ``out`` it is written
    there using ``inputs.scratch``, allocating nothing (for f in float32).
    Both forms perform the same float32 operations, so they agree to the bit.
    """
    B = inputs.x32.shape[0]
    f = f.to(torch.float32)  # engines with fp16/bf16 outputs: one conversion
    assert cfg_scale is not None or not inputs.guided, "a guided call needs cfg_scale"
    if out is None:
        if inputs.guided:
            f_cond, f_null = f[:B], f[B:]
            f = f_null + cfg_scale * (f_cond - f_null)
        return inputs.c_skip * inputs.x32 + inputs.c_out * f
    g = inputs.scratch
    assert g is not None, "the out= form needs CallInputs.allocate() buffers"
    if inputs.guided:
        torch.sub(f[:B], f[B:], out=g)  # f_cond - f_null
        g.mul_(cfg_scale).add_(f[B:])  # s * (f_cond - f_null) + f_null
        g.mul_(inputs.c_out)
    else:
        torch.mul(inputs.c_out, f, out=g)
    torch.mul(inputs.c_skip, inputs.x32, out=out)
    return out.add_(g)


def check_active(active: Sequence[int], num_bricks: int) -> tuple[int, ...]:
    """Sorted, de-duplicated active set; at least one brick, all in range."""
    act = tuple(sorted(set(int(k) for k in active)))
    if not act:
        raise ShapeError("at least one brick must run in every denoiser call")
    if act[0] < 0 or act[-1] >= num_bricks:
        raise ShapeError(f"active bricks {list(act)} out of range: this model has bricks 0..{num_bricks - 1}")
    return act


def denoise_with_bricks(
    embed: Callable[[Tensor, Tensor | None], Tensor],
    bricks: Sequence[Callable[[Tensor, Tensor | None, Tensor], Tensor]],
    x: Tensor,
    sigma: Tensor,
    *,
    config: LegoConfig,
    class_labels: Tensor | None = None,
    active: Sequence[int] | None = None,
    cfg_scale: float | None = None,
) -> Tensor:
    """One denoiser call through any embedder and bricks (eager modules or engine runners).

    x: (B, C, H, W) any float dtype; sigma: (B,) or scalar; class_labels: (B, label_dim)
    one-hot or None (null label); returns D in float32.
    """
    B, C, H, W = x.shape
    config.check_image_size(H, W)
    act = check_active(range(len(bricks)) if active is None else active, len(bricks))
    config.check_guidance(cfg_scale)
    guided = cfg_scale is not None
    labels = engine_labels(class_labels, B, config, guided=guided, device=x.device)
    sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).expand(B).contiguous()
    inputs = prepare_inputs(x, sigma, sigma_data=config.sigma_data, guided=guided)
    cond = embed(inputs.c_noise, labels)  # (rows, D)
    f = torch.zeros_like(inputs.x_in[:, :C])
    for k in act:
        f = bricks[k](inputs.x_in, f if k > 0 else None, cond)  # (rows, C, H, W)
    return combine_output(inputs, f, cfg_scale)
