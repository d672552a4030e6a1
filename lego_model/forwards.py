"""The engines' forwards on plain tensors, at every precision: what lego-export exports and the runtimes run eagerly.

One forward per engine kind (STYLE.md 4): the embedder ``c_noise [B]``
(, ``class_labels [B, label_dim]``) -> ``cond [B, D]``, brick 0
``x_in, cond -> f`` and brick k > 0 ``x_in, f_prev, cond -> f``
(shared/DESIGN.md, "Engine contract"); :func:`engine_forward` picks one.

I/O is float32 at every precision; fp16/bf16 forwards cast at their
boundary.  That keeps the brick chain, the EDM arithmetic and the runtimes'
bound buffers independent of the precision, and f (which flows from brick to
brick) keeps fp32 resolution; the casts cost a few elementwise passes over
tensors of C+2 channels, negligible next to the transformer blocks.  Inside,
a half-precision forward is :func:`half_precision_copy` of the model's
modules: weights cast once, LayerNorm, the attention softmax (and in bf16 the
patch-embedding convolution) kept in float32.

At every precision the exported attention is written out as
``softmax((q / sqrt(d)) k^T) v`` (:class:`Fp32SoftmaxAttention`), not
``F.scaled_dot_product_attention``: the dynamo exporter decomposes the latter
into a K transpose through Reshape-Transpose-Reshape and scales q and k
separately, which hid the pattern from OpenVINO's attention fusion once the
products are int8 (quantize/dequantize pairs around them) and left ONNX
Runtime's MatMul-with-transposed-input fusion one Transpose short.  The eager
model keeps SDPA (torch's fused CPU/GPU kernels); the two agree to fp32 rounding.
Attention over tiles of a few tokens is written over blocks of several
consecutive tiles, masked (:func:`attention_group`): the same numbers in
products and softmax rows wide enough for the CPU kernels.  Likewise the fp32
(and int8) files write the patch embedding as a MatMul on patches already in
tile order (:class:`PatchLinear`), not a Conv followed by a transpose of its
D-wide output, for a convolution OpenVINO miscomputed in bf16 on AMX.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lego_model.configs import LegoConfig
from lego_model.model import Attention, Brick, LegoModel, PatchEmbed

__all__ = [
    "ATTENTION_BLOCK_TOKENS",
    "PRECISION_TORCH_DTYPES",
    "BrickGraph",
    "EmbedderGraph",
    "FirstBrickGraph",
    "Fp32Conv2d",
    "Fp32LayerNorm",
    "Fp32SoftmaxAttention",
    "UnconditionalEmbedderGraph",
    "attention_group",
    "engine_forward",
    "fp32_export_copy",
    "half_precision_copy",
    "patch_matmul_copy",
]

# Engine precision (lego-export's --precision) -> the dtype its weights and computation use.
PRECISION_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    """The brick's tile attention written out, with a float32 softmax: the exported form at every precision.

    Same computation as :class:`lego_model.model.Attention` (scaled dot product
    inside each tile) as MatMul(q scaled, Transpose(k)) -> Softmax -> MatMul(v),
    the pattern ONNX runtimes fuse (module docstring); in half precision the
    logits are upcast before the softmax: exp() of fp16 logits saturates and its
    row sums lose precision.  q is scaled before the product to keep the fp16
    logits small.  In fp32 the casts are no-ops.

    Not a ScaledDotProductAttention op: OpenVINO 2026.4's CPU plugin decomposed
    that op into this same pattern (also with a state variable added), and its fused
    attention of this pattern runs as fast as torch's flash kernel (one
    1024-token layer of 6 heads, bf16, one thread of the Intel AMX machine:
    5.1 against 5.2 ms, softmax-bound: its unfused Softmax alone takes 2.8 ms).

    ``group`` > 1 (:func:`attention_group`): that many consecutive tiles are one
    block of products and softmax rows, the logits between different tiles
    masked to -inf.  Their softmax weights are exactly 0 and add exact zeros to
    the sums, so the result is the per-tile attention's; the runtimes get
    products and softmax rows ``group`` times wider (see ATTENTION_BLOCK_TOKENS).
    """

    def __init__(self, attn: Attention, group: int = 1) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.tile_tokens = attn.tile_tokens
        self.group = group
        self.qkv = attn.qkv
        self.proj = attn.proj
        T = attn.tile_tokens
        tile = torch.arange(group * T) // T
        mask = torch.zeros(group * T, group * T).masked_fill(tile[:, None] != tile[None, :], float("-inf"))
        # A constant of the exported graph (not a state-dict entry); None where tiles are not grouped.
        self.register_buffer("mask", mask if group > 1 else None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        T, heads = self.tile_tokens * self.group, self.num_heads  # tokens per block of `group` tiles
        qkv = self.qkv(x).reshape(-1, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # (3, blocks, h, T, d)
        q, k, v = qkv.unbind(0)  # (blocks, h, T, d) each
        logits = ((q * (D // heads) ** -0.5) @ k.transpose(-1, -2)).float()  # (blocks, h, T, T), fp32
        if self.mask is not None:
            logits = logits + self.mask  # -inf between tokens of different tiles
        weights = logits.softmax(dim=-1).to(x.dtype)  # softmax in fp32
        o = (weights @ v).transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(o)


# Exported attention of small tiles runs in blocks of up to this many tokens (Fp32SoftmaxAttention's group):
# OpenVINO's CPU Softmax costs about as much per 4-wide row as per 16-wide one, and 4x4 products barely use a
# matrix unit.  2-core Intel AMX, OpenVINO bf16, interleaved: the attention products + softmax of lego_S_PG_64's
# 4-token tiles 0.67 -> 0.22 ms per layer; its brick0 7.6 -> 6.7 ms, the shipped model's brick0 at batch 16
# 1.44 -> 1.14 ms (fp32 1.08x, ONNX Runtime unchanged).  Blocks of 32 tokens gained no more in bf16 and lost in fp32.
ATTENTION_BLOCK_TOKENS = 16


def attention_group(config: LegoConfig, brick: int) -> int:
    """How many consecutive tiles of ``brick`` the exported attention computes as one masked block.

    The largest power of two G with G * tile tokens <= ATTENTION_BLOCK_TOKENS
    that divides the tile count of every canvas the model takes: sides are
    multiples of ``size_multiple`` R, so a canvas has a multiple of
    (R / r_k)^2 tiles of size r_k, and the blocks never straddle a canvas.
    """
    T = config.tile_tokens(brick)
    tiles = (config.size_multiple // config.brick_sizes[brick]) ** 2
    group = 1
    while 2 * group * T <= ATTENTION_BLOCK_TOKENS and tiles % (2 * group) == 0:
        group *= 2
    return group


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


class PatchLinear(nn.Module):
    """A brick's patch embedding (:class:`lego_model.model.PatchEmbed`) as patches @ weight: its exported form.

    The same tokens (B, L, T, D) as the convolution followed by the tile
    regrouping, to fp32 summation order, computed the other way round: the
    image (C+2 or 2C+2 channels) is regrouped into tile-ordered patches first
    and one product makes the tokens, so no D-wide tensor is transposed (on
    lego_S_PG_64's last brick OpenVINO spent 0.6 ms per call in the two
    transposes of the 384-channel output, of 35 ms; the 5-8-channel input costs
    a few percent of that).  A MatMul rather than a Conv because OpenVINO
    2026.4's AMX bf16 convolution (brgconv) returned wrong numbers for the
    bricks' 8x8 stride-8 patch convolution on 8 input channels (relative L2
    error 1.1 against fp32 on the Intel AMX machine; 2x2 kernels and 5 input
    channels were right), which made lego_S_PG_64's brick1 wrong in OpenVINO's
    bf16 and int8 runs there; a MatMul is a product every runtime runs well.
    """

    def __init__(self, embed: PatchEmbed) -> None:
        super().__init__()
        conv, p = embed.proj, embed.patch
        if conv.kernel_size != (p, p) or conv.stride != (p, p) or conv.padding != (0, 0) or conv.groups != 1:
            raise ValueError(f"PatchLinear needs a square kernel equal to its stride, no padding: got {conv}")
        self.patch = p
        # (D, C*p*p): a view of the convolution's weight (no copy), exported as one initializer, as the
        # quantizer wants a product's weight (a Reshape in the graph would hide it).
        self.register_buffer("weight", conv.weight.detach().reshape(conv.out_channels, -1), persistent=False)
        self.bias = conv.bias

    def forward(self, x: Tensor, tile: int) -> Tensor:
        B, C, H, W = x.shape
        p = self.patch
        g, nh, nw = tile // p, H // tile, W // tile
        patches = x.reshape(B, C, nh, g, p, nw, g, p).permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, nh, nw, g, g, C, p, p)
        return F.linear(patches.reshape(B, nh * nw, g * g, C * p * p), self.weight, self.bias)  # (B, L, T, D)


def fp32_export_copy(module: nn.Module, attention_group: int = 1) -> nn.Module:
    """``module`` with its attention and patch embeddings in the exported forms (:class:`Fp32SoftmaxAttention`
    over blocks of ``attention_group`` tiles, :class:`PatchLinear`), sharing its weights.

    The module tree is copied (the caller's model is not changed), its
    parameters and buffers are not: an fp32 export costs no second copy of the weights.
    """

    def exported(child: nn.Module) -> nn.Module | None:
        if isinstance(child, Attention):
            return Fp32SoftmaxAttention(child, attention_group)
        return PatchLinear(child) if isinstance(child, PatchEmbed) else None

    return _shared_copy(module, exported)


def patch_matmul_copy(module: nn.Module) -> nn.Module:
    """``module`` with its patch embeddings as :class:`PatchLinear` and nothing else changed, sharing its weights.

    What the torch backend runs under CPU autocast for bf16: oneDNN's AMX bf16
    convolution miscomputes the 8x8 patches (:class:`PatchLinear`), while the
    model's own attention (``F.scaled_dot_product_attention``, torch's fused
    kernel) ran lego_S_PG_64's last brick in 47 ms against 158 ms for the
    exported written-out form under autocast (2-core Intel AMX machine).
    """
    return _shared_copy(module, lambda child: PatchLinear(child) if isinstance(child, PatchEmbed) else None)


def _shared_copy(module: nn.Module, replace: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """A copy of ``module``'s tree sharing its parameters and buffers, each child that ``replace`` maps to a
    module swapped for it."""
    shared = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    out = copy.deepcopy(module, memo=shared)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            new = replace(child)
            if new is not None:
                setattr(parent, name, new)
    return out


def half_precision_copy(module: nn.Module, precision: str, attention_group: int = 1) -> nn.Module:
    """A copy of ``module`` in fp16/bf16 whose LayerNorms and attention softmaxes stay in fp32.

    The embedder's sinusoidal timestep features are computed in fp32 by the
    model itself (``timestep_features``) whatever the weights' dtype.  In bf16
    the patch-embedding convolution stays fp32 too (see :class:`Fp32Conv2d`).
    """
    dtype = PRECISION_TORCH_DTYPES[precision]
    out = copy.deepcopy(module).to(dtype)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, Fp32LayerNorm(child))
            elif isinstance(child, Attention):
                setattr(parent, name, Fp32SoftmaxAttention(child, attention_group))
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

    def __init__(self, brick: Brick, precision: str, attention_group: int = 1) -> None:
        super().__init__()
        if precision == "fp32":
            self.brick = fp32_export_copy(brick, attention_group)
        else:
            self.brick = half_precision_copy(brick, precision, attention_group)
        self.dtype = PRECISION_TORCH_DTYPES[precision]

    def forward(self, x_in: Tensor, f_prev: Tensor, cond: Tensor) -> Tensor:
        return self.brick(x_in.to(self.dtype), f_prev.to(self.dtype), cond.to(self.dtype)).float()  # (B, C, H, W)


class FirstBrickGraph(BrickGraph):
    """Brick 0 as exported: x_in, cond -> f (there is no previous f)."""

    def forward(self, x_in: Tensor, cond: Tensor) -> Tensor:
        return self.brick(x_in.to(self.dtype), None, cond.to(self.dtype)).float()  # (B, C, H, W)


def engine_forward(model: LegoModel, kind: str, brick: int | None, precision: str) -> nn.Module:
    """The forward of engine ``kind`` ("embedder" or "brick" ``brick``) of ``model`` at ``precision``, in eval mode.

    The half-precision ones hold copies of the weights (``model`` is not changed); fp32 ones share them
    (:func:`fp32_export_copy`).
    """
    if kind == "embedder":
        graph = EmbedderGraph if model.config.label_dim else UnconditionalEmbedderGraph
        return graph(model, precision).eval()
    if kind == "brick":
        graph = FirstBrickGraph if brick == 0 else BrickGraph
        return graph(model.bricks[brick], precision, attention_group(model.config, brick)).eval()
    raise NotImplementedError(f"no exported forward for engine kind {kind!r}")
