"""The LEGO network: bricks of tile-wise DiTs, a timestep and a label embedder.

Module and parameter names follow the authors' EDMPrecondLEGO so that their
state dicts load with ``strict=True``: ``LegoModel.model`` is their ``LEGO``,
``LegoModel.model.model[k]`` is brick k.  Unlike the authors' code, a brick runs
its patch-embedding convolution over the whole canvas and then groups the
tokens into tiles, which is the same computation (tiles never overlap because
r_k is a multiple of p_k) for any H and W, square or not.

Brick-level API (shared/DESIGN.md, "One denoiser call"):

    cond = model.embed(c_noise, class_labels)        # [B, D]
    f    = model.bricks[k](x_in, f_prev, cond)        # [B, C, H, W]; f_prev is None for k = 0
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lego_model.configs import LegoConfig
from lego_model.precond import denoise_with_bricks


def sincos_pos_table(hidden_size: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position table of a ``grid x grid`` token grid, shape (1, grid*grid, D).

    As in MAE/DiT: the first half of the channels encodes the column index, the
    second half the row index, each as [sin(pos * w), cos(pos * w)] with
    w_i = 10000^(-i / (D/4)), computed in float64.
    """
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega  # (T, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (T, D/2)

    table = torch.cat([encode(cols), encode(rows)], dim=1)  # (T, D)
    return table.float().unsqueeze(0)


def timestep_features(c_noise: Tensor, num_channels: int = 256) -> Tensor:
    """Sinusoidal features of the noise level, [cos | sin] as in the authors' PositionalEmbedding.

    Kept in float32 whatever the model precision: c_noise * freq reaches ~3 and
    fp16 would lose the low-frequency phases.
    """
    half = num_channels // 2
    freqs = (1.0 / 10000) ** (torch.arange(half, dtype=torch.float32, device=c_noise.device) / half)
    angles = c_noise.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, num_channels)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation; x is (B, N, D), shift and scale are (B, D)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, c_noise: Tensor) -> Tensor:
        t = timestep_features(c_noise, self.frequency_size)  # (B, 256) float32
        return self.mlp(t.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """One-hot (or soft) label vector -> embedding; the all-zero vector is the null label."""

    def __init__(self, label_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.embedding_table = nn.Linear(label_dim, hidden_size)

    def forward(self, class_labels: Tensor) -> Tensor:
        return self.embedding_table(class_labels)  # (B, D)


class PatchEmbed(nn.Module):
    """Patch embedding (the authors' convolution, kernel = stride = p) to tokens grouped by tile."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.patch = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor, tile: int) -> Tensor:
        """(B, C, H, W) -> (B, L, T, D): the tiles of ``tile`` x ``tile`` pixels row-major, each tile's patches
        row-major (T = (tile / p)^2 tokens)."""
        B, _, H, W = x.shape
        g, nh, nw = tile // self.patch, H // tile, W // tile  # tokens per tile side, tiles per canvas side
        t = self.proj(x)  # (B, D, H/p, W/p)
        D = t.shape[1]
        t = t.reshape(B, D, nh, g, nw, g).permute(0, 2, 4, 3, 5, 1)  # (B, nh, nw, g, g, D)
        return t.reshape(B, nh * nw, g * g, D)


class Attention(nn.Module):
    """Multi-head self-attention inside each tile of ``tile_tokens`` consecutive tokens."""

    def __init__(self, hidden_size: int, num_heads: int, tile_tokens: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.tile_tokens = tile_tokens
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        T, heads = self.tile_tokens, self.num_heads
        qkv = self.qkv(x).reshape(-1, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # (3, B*L, h, T, d)
        q, k, v = qkv.unbind(0)  # (B*L, h, T, d) each
        o = F.scaled_dot_product_attention(q, k, v)  # (B*L, h, T, d): attention stays inside a tile
        o = o.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(o)


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_ratio: float) -> None:
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT, Peebles & Xie 2023, Fig. 3)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, tile_tokens: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, tile_tokens)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(cond).chunk(6, dim=1)
        x = x + gate_msa[:, None, :] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, N, D)
        x = x + gate_mlp[:, None, :] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C)


class Brick(nn.Module):
    """Brick k: a DiT applied to every non-overlapping r_k x r_k tile of the canvas.

    Input channels are [f_prev (C), x_in (C+2)] for k > 0 and x_in alone for
    brick 0; the output is f, C channels at full resolution.
    """

    def __init__(self, config: LegoConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.size = config.brick_sizes[index]
        self.patch = config.patch_sizes[index]
        self.out_channels = config.img_channels
        hidden = config.hidden_size
        in_channels = config.img_channels + 2 + (config.img_channels if index > 0 else 0)
        grid = self.size // self.patch
        self.x_embedder = PatchEmbed(in_channels, hidden, self.patch)
        # A fixed table, but a persistent buffer: the authors' state dicts carry it.
        self.register_buffer("pos_embed", sincos_pos_table(hidden, grid))
        self.blocks = nn.ModuleList(
            [
                DiTBlock(hidden, config.num_heads, config.mlp_ratio, config.tile_tokens(index))
                for _ in range(config.depths[index])
            ]
        )
        self.final_layer = FinalLayer(hidden, self.patch, self.out_channels)

    def forward(self, x_in: Tensor, f_prev: Tensor | None, cond: Tensor) -> Tensor:
        x = x_in if f_prev is None else torch.cat([f_prev, x_in], dim=1)  # (B, Cin, H, W)
        B, _, H, W = x.shape
        r, p, C = self.size, self.patch, self.out_channels
        g = r // p  # tokens per tile side
        nh, nw = H // r, W // r  # tiles per canvas side
        t = self.x_embedder(x, r) + self.pos_embed  # (B, L, T, D), tiles row-major
        D = t.shape[-1]
        # The blocks see (B, N = L*T, D), one tile after another: 3-D products, whose bias, GELU and (in int8
        # files) dequantization OpenVINO fuses into the matmul (with 4-D inputs its int8 kernels left them as
        # separate passes); attention regroups the tiles itself.  Same arithmetic as (B, L, T, D).
        t = t.reshape(B, nh * nw * g * g, D)
        for block in self.blocks:
            t = block(t, cond)  # (B, N, D)
        t = self.final_layer(t, cond)  # (B, N, p*p*C)
        t = t.reshape(B, nh, nw, g, g, p, p, C).permute(0, 7, 1, 3, 5, 2, 4, 6)  # (B, C, nh, g, p, nw, g, p)
        return t.reshape(B, C, H, W)  # (B, C, H, W)


class LegoBackbone(nn.Module):
    """The authors' ``LEGO`` module: the bricks plus the conditioning embedders."""

    def __init__(self, config: LegoConfig) -> None:
        super().__init__()
        self.model = nn.ModuleList([Brick(config, k) for k in range(config.num_bricks)])
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(config.label_dim, config.hidden_size) if config.label_dim else None
        # Only present so that checkpoints trained with augmentation load strictly; unused at inference.
        self.map_augment = nn.Linear(config.augment_dim, config.hidden_size) if config.augment_dim else None

    def embed(self, c_noise: Tensor, class_labels: Tensor | None) -> Tensor:
        cond = self.t_embedder(c_noise)  # (B, D)
        if self.y_embedder is not None:
            assert class_labels is not None, "a class-conditional model needs labels (zeros for the null label)"
            cond = cond + self.y_embedder(class_labels.to(cond.dtype))  # (B, D)
        return cond


class LegoModel(nn.Module):
    """EDM-preconditioned LEGO model, state-dict compatible with the authors' EDMPrecondLEGO."""

    def __init__(self, config: LegoConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LegoBackbone(config)
        self.reset_parameters()

    @property
    def bricks(self) -> nn.ModuleList:
        return self.model.model

    def embed(self, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Embedder: c_noise [B] (and one-hot labels [B, label_dim]) -> cond [B, D]."""
        return self.model.embed(c_noise, class_labels)

    def forward(
        self,
        x: Tensor,
        sigma: Tensor,
        class_labels: Tensor | None = None,
        active: tuple[int, ...] | None = None,
        cfg_scale: float | None = None,
    ) -> Tensor:
        """D(x; sigma, y) with the bricks in ``active`` (all when None), float32 out."""
        return denoise_with_bricks(
            self.embed,
            list(self.bricks),
            x,
            sigma,
            class_labels=class_labels,
            active=active,
            cfg_scale=cfg_scale,
            config=self.config,
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The authors' initialisation: xavier linears, adaLN-Zero, N(0, 0.02) embedders (for training).

        It zeroes every brick's output; random-weight exports and tests use :meth:`randomize_` instead.
        """

        def xavier(w: Tensor) -> None:
            fan_out, fan_in = w.shape[0], w[0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            w.copy_(torch.rand(w.shape) * 2 * bound - bound)

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                xavier(module.weight)
                nn.init.zeros_(module.bias)
        for brick in self.bricks:
            for block in brick.blocks:
                block.adaLN_modulation[-1].weight.zero_()
                block.adaLN_modulation[-1].bias.zero_()
            brick.final_layer.adaLN_modulation[-1].weight.zero_()
            brick.final_layer.adaLN_modulation[-1].bias.zero_()
            brick.final_layer.linear.weight.zero_()
            brick.final_layer.linear.bias.zero_()
        for linear in [self.model.t_embedder.mlp[0], self.model.t_embedder.mlp[2]]:
            linear.weight.copy_(torch.randn(linear.weight.shape) * 0.02)
        if self.model.y_embedder is not None:
            w = self.model.y_embedder.embedding_table.weight
            w.copy_(torch.randn(w.shape) * 0.02)

    @torch.no_grad()
    def randomize_(self, seed: int = 0) -> LegoModel:
        """Random weights everywhere (adaLN and heads included), for architecture-only tests and exports.

        The authors' zero init makes every brick output exactly zero, which
        would hide any bug in an exported graph.  Weights are N(0, 1/fan_in) so
        that activations stay of order one through deep stacks.
        """
        gen = torch.Generator().manual_seed(seed)
        for param in self.parameters():
            std = 1 / math.sqrt(param[0].numel()) if param.dim() > 1 else 0.02
            param.copy_(torch.randn(param.shape, generator=gen) * std)
        return self
