"""One export spec per engine: names, I/O tensors, dynamic axes, sample inputs, profile shapes.

The engine contract (shared/DESIGN.md): brick k takes ``x_in`` [B, C+2, H, W],
``f_prev`` [B, C, H, W] (k > 0 only) and ``cond`` [B, D] and returns ``f``
[B, C, H, W]; the embedder takes ``c_noise`` [B] (and ``class_labels``
[B, label_dim] for class-conditional models) and returns ``cond`` [B, D].

Engine I/O is float32 at every precision; fp16/bf16 engines cast at their
boundary.  That keeps the brick chain, the EDM arithmetic and the runtimes'
bound buffers independent of the precision, and f (which flows from brick to
brick) keeps fp32 resolution; the casts cost a few elementwise passes over
tensors of C+2 channels, negligible next to the transformer blocks.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export.errors import ProfileError
from export.records import IO_DTYPE, PRECISION_DTYPES, PROFILE_LIMITS, TORCH_DTYPES, Profile, TensorSpec, contract_io
from lego_model.configs import LegoConfig
from lego_model.model import Attention, Brick, LegoModel
from lego_model.precond import prepare_inputs

__all__ = ["DEFAULT_BATCH", "IO_DTYPE", "EngineSpec", "check_profile", "default_profile", "engine_specs", "parse_range"]

DEFAULT_BATCH = (1, 1, 8)


# ---------------------------------------------------------------------------------------------- shape ranges


def parse_range(text: str, what: str = "range") -> tuple[int, int, int]:
    """Parse ``MIN:OPT:MAX`` (or a single ``N`` meaning N:N:N) into a checked triple."""
    parts = text.strip().split(":")
    if len(parts) == 1:
        parts = parts * 3
    # ASCII digits only: str.isdigit() also accepts "²", which int() then refuses.
    if len(parts) != 3 or not all(re.fullmatch(r"[0-9]+", p.strip()) for p in parts):
        raise ProfileError(f"{what} {text!r} must be MIN:OPT:MAX (or one integer), e.g. 1:1:8")
    if any(len(p.strip()) > 9 for p in parts):  # far above every limit, and int() refuses > 4300 digits
        limits = ", ".join(f"{axis} {n}" for axis, n in PROFILE_LIMITS.items())
        raise ProfileError(f"{what} {text!r} is out of range; the largest MAX lego-export accepts is {limits}")
    lo, opt, hi = (int(p) for p in parts)
    if not 0 < lo <= opt <= hi:
        raise ProfileError(f"{what} {text!r} must satisfy 0 < MIN <= OPT <= MAX")
    return lo, opt, hi


def default_profile(config: LegoConfig) -> Profile:
    """Batch 1:1:8; height and width from the smallest legal size to 4x the training size, opt = training size."""
    m, res = config.size_multiple, config.resolution
    side = (m, res, max(4 * res, m))
    return Profile(batch=DEFAULT_BATCH, height=side, width=side)


def check_profile(profile: Profile, config: LegoConfig) -> None:
    """Every height and width bound must be a legal image side (a multiple of every brick size)."""
    m = config.size_multiple
    for axis in ("height", "width"):
        values = getattr(profile, axis)
        bad = [v for v in values if v % m]
        if bad:
            raise ProfileError(
                f"{axis} range {':'.join(map(str, values))} has sides {bad} that are not multiples of {m} "
                f"(the lcm of the brick sizes {list(config.brick_sizes)} of {config.name}); choose multiples of {m}"
            )


def profile_shapes(spec: EngineSpec, profile: Profile) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Input name -> (min, opt, max) concrete shapes, as a TensorRT optimization profile wants them."""
    corners = [(profile.batch[i], profile.height[i], profile.width[i]) for i in range(3)]
    return {t.name: tuple(t.concrete(*c) for c in corners) for t in spec.inputs}


# ------------------------------------------------------------------------------------ half-precision graphs


class Fp32LayerNorm(nn.Module):
    """LayerNorm evaluated in float32 inside a half-precision graph.

    The variance of a 384-1152 wide row overflows or loses most of its digits
    in fp16; TensorRT, strongly typed, computes in the dtype the ONNX gives it.
    """

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.normalized_shape = norm.normalized_shape
        self.eps = norm.eps
        self.weight = None if norm.weight is None else nn.Parameter(norm.weight.detach().float())
        self.bias = None if norm.bias is None else nn.Parameter(norm.bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)  # fp32
        return y.to(x.dtype)


class Fp32SoftmaxAttention(nn.Module):
    """The brick's tile attention with half-precision matmuls and a float32 softmax.

    Same computation as :class:`lego_model.model.Attention` (scaled dot product
    inside each tile), written out so that the logits can be upcast before the
    softmax: exp() of fp16 logits saturates and its row sums lose precision.
    q is scaled before the product to keep the fp16 logits small.
    """

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.qkv = attn.qkv
        self.proj = attn.proj

    def forward(self, x: Tensor) -> Tensor:
        B, L, T, D = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(-1, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # (3, B*L, h, T, d)
        q, k, v = qkv.unbind(0)  # (B*L, h, T, d) each
        logits = (q * (D // heads) ** -0.5) @ k.transpose(-1, -2)  # (B*L, h, T, T), half
        weights = logits.float().softmax(dim=-1).to(x.dtype)  # softmax in fp32
        o = (weights @ v).transpose(1, 2).reshape(B, L, T, D)  # (B, L, T, D)
        return self.proj(o)


class Fp32Conv2d(nn.Module):
    """A convolution evaluated in float32: ONNX Conv has no bfloat16 type before opset 22.

    Only the patch embedding is a convolution, one matmul-sized op per brick,
    so bf16 graphs lose nothing measurable by keeping it in fp32.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = copy.deepcopy(conv).float()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.float()).to(x.dtype)


def half_precision_copy(module: nn.Module, precision: str) -> nn.Module:
    """A copy of ``module`` in fp16/bf16 whose LayerNorms and attention softmaxes stay in fp32.

    The embedder's sinusoidal timestep features are computed in fp32 by the
    model itself (``timestep_features``) whatever the weights' dtype.  In bf16
    the patch-embedding convolution stays fp32 too (see :class:`Fp32Conv2d`).
    """
    dtype = TORCH_DTYPES[PRECISION_DTYPES[precision]]
    out = copy.deepcopy(module).to(dtype)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, Fp32LayerNorm(child))
            elif isinstance(child, Attention):
                setattr(parent, name, Fp32SoftmaxAttention(child))
            elif isinstance(child, nn.Conv2d) and dtype == torch.bfloat16:
                setattr(parent, name, Fp32Conv2d(child))
    return out


# ----------------------------------------------------------------------------------- exported forwards


class EmbedderGraph(nn.Module):
    """The embedder as exported: c_noise [B], class_labels [B, label_dim] -> cond [B, D], float32 I/O."""

    def __init__(self, model: LegoModel, precision: str) -> None:
        super().__init__()
        backbone = model.model
        self.t_embedder = backbone.t_embedder
        self.y_embedder = backbone.y_embedder
        if precision != "fp32":
            self.t_embedder = half_precision_copy(self.t_embedder, precision)
            self.y_embedder = None if self.y_embedder is None else half_precision_copy(self.y_embedder, precision)

    def forward(self, c_noise: Tensor, class_labels: Tensor) -> Tensor:
        cond = self.t_embedder(c_noise)  # (B, D); the sinusoid is computed in fp32 inside
        cond = cond + self.y_embedder(class_labels.to(cond.dtype))  # (B, D)
        return cond.float()


class UnconditionalEmbedderGraph(EmbedderGraph):
    """The embedder of a model without labels: c_noise [B] -> cond [B, D]."""

    def forward(self, c_noise: Tensor) -> Tensor:
        return self.t_embedder(c_noise).float()  # (B, D)


class BrickGraph(nn.Module):
    """Brick k > 0 as exported: x_in, f_prev, cond -> f, float32 I/O, computed in the engine precision."""

    def __init__(self, brick: Brick, precision: str) -> None:
        super().__init__()
        self.brick = brick if precision == "fp32" else half_precision_copy(brick, precision)
        self.dtype = TORCH_DTYPES[PRECISION_DTYPES[precision]]

    def forward(self, x_in: Tensor, f_prev: Tensor, cond: Tensor) -> Tensor:
        return self.brick(x_in.to(self.dtype), f_prev.to(self.dtype), cond.to(self.dtype)).float()  # (B, C, H, W)


class FirstBrickGraph(BrickGraph):
    """Brick 0 as exported: x_in, cond -> f (there is no previous f)."""

    def forward(self, x_in: Tensor, cond: Tensor) -> Tensor:
        return self.brick(x_in.to(self.dtype), None, cond.to(self.dtype)).float()  # (B, C, H, W)


# ---------------------------------------------------------------------------------------------- the specs


@dataclass(frozen=True)
class EngineSpec:
    """Everything about one engine that does not depend on the precision or the exporter."""

    name: str  # "embedder", "brick0", ...
    kind: str  # "embedder" | "brick"
    brick: int | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    tile: int  # H and W of this engine must be multiples of this (1 for the embedder)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def module(self, model: LegoModel, precision: str) -> nn.Module:
        """The forward to export, in eval mode."""
        if self.kind == "embedder":
            graph = EmbedderGraph if model.config.label_dim else UnconditionalEmbedderGraph
            return graph(model, precision).eval()
        if self.kind == "brick":
            graph = FirstBrickGraph if self.brick == 0 else BrickGraph
            return graph(model.bricks[self.brick], precision).eval()
        raise NotImplementedError(f"no exported forward for engine kind {self.kind!r}")

    def sample_inputs(self, model: LegoModel, batch: int, height: int, width: int, seed: int = 0) -> dict[str, Tensor]:
        """Realistic float32 inputs: noise levels of the EDM range, one-hot labels, cond from the embedder."""
        gen = torch.Generator().manual_seed(seed)
        config = model.config
        sigma = torch.exp(torch.randn(batch, generator=gen) * 1.2 - 1.2).clamp(0.002, 80.0)  # EDM's P_mean, P_std
        labels = None
        if config.label_dim:
            idx = torch.randint(config.label_dim, (batch,), generator=gen)
            labels = F.one_hot(idx, config.label_dim).float()  # (B, label_dim)
            if batch > 1:
                labels[batch // 2 :] = 0  # null rows, as classifier-free guidance sends them
        C = config.img_channels
        x = torch.randn(batch, C, height, width, generator=gen) * sigma.reshape(-1, 1, 1, 1)
        call = prepare_inputs(x, sigma, sigma_data=config.sigma_data, guided=False)  # x_in, c_noise (B,)
        if self.kind == "embedder":
            out = {"c_noise": call.c_noise}
            if labels is not None:
                out["class_labels"] = labels
            return out
        with torch.no_grad():
            cond = model.embed(call.c_noise, labels).float()  # (B, D)
        out = {"x_in": call.x_in}
        if self.brick > 0:
            out["f_prev"] = torch.randn(batch, C, height, width, generator=gen) * 0.5
        out["cond"] = cond
        return out

    def dynamic_shapes(self) -> tuple[dict[int, object], ...]:
        """torch.export dims: B free, H = tile * nh, W = tile * nw with nh and nw independent."""
        from torch.export import Dim

        batch = Dim("B", min=1)
        sizes: dict[str, object] = {"B": batch}
        if self.kind == "brick":
            # Derived dims state what the graph needs (whole tiles); H and W are separate symbols,
            # so the export cannot silently tie them together (non-square images stay legal).
            sizes["H"] = self.tile * Dim("nh", min=1)
            sizes["W"] = self.tile * Dim("nw", min=1)
        return tuple({i: sizes[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """The same dims for the TorchScript exporter (names only, no constraints)."""
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in [*self.inputs, *self.outputs]
        }


def engine_specs(config: LegoConfig) -> list[EngineSpec]:
    """The embedder and one spec per brick, in stacking order; I/O from the engine contract (contract_io)."""
    engines = [("embedder", "embedder", None, 1)]
    engines += [(f"brick{k}", "brick", k, r) for k, r in enumerate(config.brick_sizes)]
    specs = []
    for name, kind, brick, tile in engines:
        inputs, outputs = contract_io(config, kind, brick)
        specs.append(EngineSpec(name=name, kind=kind, brick=brick, inputs=inputs, outputs=outputs, tile=tile))
    return specs
