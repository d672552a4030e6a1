"""One export spec per engine: names, I/O tensors, dynamic axes, sample inputs, profile shapes.

The engine contract (shared/DESIGN.md): brick k takes ``x_in`` [B, C+2, H, W],
``f_prev`` [B, C, H, W] (k > 0 only) and ``cond`` [B, D] and returns ``f``
[B, C, H, W]; the embedder takes ``c_noise`` [B] (and ``class_labels``
[B, label_dim] for class-conditional models) and returns ``cond`` [B, D].

Engine I/O is float32 at every precision; the forwards themselves, and why
their I/O is float32, are :mod:`lego_model.forwards`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export.errors import ProfileError
from export.records import IO_DTYPE, PROFILE_LIMITS, Profile, TensorSpec, contract_io
from lego_model.configs import LegoConfig
from lego_model.errors import TextError
from lego_model.forwards import engine_forward
from lego_model.model import LegoModel
from lego_model.parsing import is_whole_number, parse_int, quoted
from lego_model.precond import prepare_inputs

__all__ = ["DEFAULT_BATCH", "IO_DTYPE", "EngineSpec", "check_profile", "default_profile", "engine_specs", "parse_range"]

DEFAULT_BATCH = (1, 1, 8)


# ---------------------------------------------------------------------------------------------- shape ranges


def parse_range(text: str, what: str = "range", maximum: int = max(PROFILE_LIMITS.values())) -> tuple[int, int, int]:
    """Parse ``MIN:OPT:MAX`` (or a single ``N`` meaning N:N:N) into a checked triple, each at most ``maximum``.

    Numbers are read by :func:`lego_model.parsing.parse_int` (ASCII digits, spaces around them allowed).
    """
    parts = text.split(":") if isinstance(text, str) else []
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or not all(is_whole_number(p) for p in parts):
        raise ProfileError(f"{what} {quoted(text)} must be MIN:OPT:MAX (or one integer) in ASCII digits, e.g. 1:1:8")
    try:
        # from 1: a range of 0 rows or pixels is no profile, and the message says the minimum that is
        lo, opt, hi = (parse_int(p, f"{what} {field}", 1, maximum) for p, field in zip(parts, ("MIN", "OPT", "MAX")))
    except TextError as err:
        raise ProfileError(str(err)) from None
    if not lo <= opt <= hi:
        raise ProfileError(f"{what} {quoted(text)} must satisfy 0 < MIN <= OPT <= MAX")
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
        """The forward to export, in eval mode (:func:`lego_model.forwards.engine_forward`)."""
        return engine_forward(model, self.kind, self.brick, precision)

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
