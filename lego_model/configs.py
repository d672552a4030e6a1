"""Model configurations: frozen dataclasses plus a registry.

``LEGO_CONFIGS`` holds every architecture the authors publish, under their
names (training/lego_models.py of JegZheng/LEGODiffusion), and the tiny
configurations the tests use.  A brick is described by its tile size r_k (the
side of the square it sees, in pixels), its token patch size p_k and its depth;
hidden size and heads are shared by all bricks because the conditioning vector
``cond`` of the embedder feeds every brick's adaLN layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from lego_model.errors import ConfigError, ShapeError


def refuse_unconditional(model: str, label_dim: int, what: str) -> None:
    """The one refusal of class conditioning (guidance, a class, labels) on an unconditional model."""
    if not label_dim:
        raise ShapeError(f"{model} is unconditional: {what} needs a class-conditional model; leave it out")


def check_class_index(model: str, label_dim: int, class_idx: int | None) -> None:
    """The one class-range check: ``class_idx`` must be one of the model's classes (None passes)."""
    if class_idx is None:
        return
    refuse_unconditional(model, label_dim, f"class {class_idx}")
    if not 0 <= class_idx < label_dim:
        raise ShapeError(f"class {class_idx} out of range: {model} has classes 0..{label_dim - 1}")


@dataclass(frozen=True)
class LegoConfig:
    """Architecture of one LEGO model; bricks are listed in stacking order."""

    name: str
    brick_sizes: tuple[int, ...]  # r_k: tile side in pixels
    patch_sizes: tuple[int, ...]  # p_k: token patch side in pixels
    depths: tuple[int, ...]  # DiT blocks per brick
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    img_channels: int = 3
    label_dim: int = 0  # number of classes; 0 = unconditional
    resolution: int = 0  # training resolution; 0 = the largest brick size
    sigma_data: float = 0.5
    augment_dim: int = 0  # the authors' augmentation-label input (training only)
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance

    def __post_init__(self) -> None:
        n = len(self.brick_sizes)
        if n == 0 or len(self.patch_sizes) != n or len(self.depths) != n:
            raise ConfigError(
                f"config {self.name!r}: brick_sizes, patch_sizes and depths need one entry per brick "
                f"(got {len(self.brick_sizes)}, {len(self.patch_sizes)}, {len(self.depths)})"
            )
        for k, (r, p, d) in enumerate(zip(self.brick_sizes, self.patch_sizes, self.depths)):
            if r <= 0 or p <= 0 or d < 0 or r % p:
                raise ConfigError(
                    f"config {self.name!r}: brick {k} has size {r}, patch {p}, depth {d}; "
                    "the size must be a positive multiple of the patch and the depth >= 0"
                )
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise ConfigError(
                f"config {self.name!r}: hidden_size {self.hidden_size} must be divisible by num_heads "
                f"{self.num_heads} and by 4 (2-D sin-cos position table)"
            )
        if self.resolution == 0:
            object.__setattr__(self, "resolution", max(self.brick_sizes))
        if self.resolution % self.size_multiple:
            raise ConfigError(
                f"config {self.name!r}: resolution {self.resolution} is not a multiple of {self.size_multiple}"
            )

    @property
    def num_bricks(self) -> int:
        return len(self.brick_sizes)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the lcm of all brick sizes."""
        return math.lcm(*self.brick_sizes)

    @property
    def global_bricks(self) -> tuple[int, ...]:
        """Bricks with the largest tiles (they see the whole training canvas)."""
        top = max(self.brick_sizes)
        return tuple(k for k, r in enumerate(self.brick_sizes) if r == top)

    @property
    def local_bricks(self) -> tuple[int, ...]:
        """Bricks with the smallest tiles."""
        low = min(self.brick_sizes)
        return tuple(k for k, r in enumerate(self.brick_sizes) if r == low)

    def check_image_size(self, height: int, width: int) -> None:
        """Raise :class:`ShapeError` unless both sides are positive multiples of every brick size."""
        m = self.size_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ShapeError(
                f"image size {height}x{width} does not fit {self.name}: height and width must be "
                f"positive multiples of {m} (brick sizes {list(self.brick_sizes)})"
            )

    def check_guidance(self, cfg_scale: float | None) -> None:
        """Refuse classifier-free guidance (``cfg_scale`` not None) on an unconditional model."""
        if cfg_scale is not None:
            refuse_unconditional(self.name, self.label_dim, "guidance (--cfg-scale)")

    def check_class(self, class_idx: int | None) -> None:
        """Refuse a class index this model does not have (None, a random class per seed, always passes)."""
        check_class_index(self.name, self.label_dim, class_idx)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LegoConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(unknown)}; valid fields: {sorted(fields)}")
        d = dict(d)
        for key in ("brick_sizes", "patch_sizes", "depths"):
            if key in d:
                d[key] = tuple(int(v) for v in d[key])
        try:
            return cls(**d)
        except TypeError as err:  # a missing required field
            raise ConfigError(f"incomplete config: {err}") from None


# The authors' model widths: S/L/XL -> (hidden size, heads), shared by every brick of a model.
# Patch sizes are per brick (_PG, _PR, _U below); depths are per config.
_WIDTHS = {"S": (384, 6), "L": (1024, 16), "XL": (1152, 16)}


def _authors(name: str, sizes: list[int], patches: list[int], depths: list[int]) -> LegoConfig:
    width = name.split("_")[1]
    hidden, heads = _WIDTHS[width]
    # _32 models run on 32x32x4 Stable-Diffusion latents of ImageNet 256, _64 on ImageNet 64 pixels.
    channels = 4 if name.split("_")[3] == "32" else 3
    return LegoConfig(
        name=name,
        brick_sizes=tuple(sizes),
        patch_sizes=tuple(patches),
        depths=tuple(depths),
        hidden_size=hidden,
        num_heads=heads,
        img_channels=channels,
        label_dim=1000,
    )


_PG, _PR, _U = [2, 8, 2], [2, 8, 2], [2, 8, 2, 8, 2]

LEGO_CONFIGS: dict[str, LegoConfig] = {
    c.name: c
    for c in [
        _authors("lego_S_PG_64", [4, 16, 64], _PG, [2, 4, 6]),
        _authors("lego_S_PR_64", [64, 16, 4], _PR, [6, 4, 2]),
        _authors("lego_S_U_32", [32, 16, 4, 16, 32], _U, [6, 4, 2, 4, 6]),
        _authors("lego_S_U_64", [64, 16, 4, 16, 64], _U, [6, 4, 2, 4, 6]),
        _authors("lego_L_PG_32", [4, 16, 32], _PG, [4, 8, 12]),
        _authors("lego_L_PR_32", [32, 16, 4], _PR, [12, 8, 4]),
        _authors("lego_L_PG_64", [4, 16, 64], _PG, [6, 8, 12]),
        _authors("lego_L_PR_64", [64, 16, 4], _PR, [12, 8, 6]),
        _authors("lego_L_U_32", [32, 16, 4, 16, 32], _U, [12, 8, 6, 8, 12]),
        _authors("lego_L_U_64", [64, 16, 4, 16, 64], _U, [12, 8, 6, 8, 12]),
        _authors("lego_L_PG_64_old", [4, 16, 64], _PG, [6, 6, 12]),
        _authors("lego_L_PR_64_old", [64, 16, 4], _PR, [12, 6, 6]),
        _authors("lego_XL_PG_32", [4, 16, 32], _PG, [4, 12, 14]),
        _authors("lego_XL_PR_32", [32, 16, 4], _PR, [14, 12, 4]),
        _authors("lego_XL_PG_64", [4, 16, 64], _PG, [4, 12, 14]),
        _authors("lego_XL_PR_64", [64, 16, 4], _PR, [14, 12, 4]),
        _authors("lego_XL_U_32", [32, 16, 4, 16, 32], _U, [14, 10, 4, 10, 14]),
        _authors("lego_XL_U_64", [64, 16, 4, 16, 64], _U, [14, 12, 4, 12, 14]),
        # Tiny configurations for tests; the first three match ../shared/fixtures/official_tiny.json.
        LegoConfig("tiny_PG_16", (4, 8, 16), (2, 4, 2), (1, 2, 2), 64, 4, label_dim=10),
        LegoConfig("tiny_PR_16", (16, 8, 4), (2, 4, 2), (2, 2, 1), 64, 4, label_dim=0),
        LegoConfig("tiny_U_16", (16, 8, 4, 8, 16), (2, 4, 2, 4, 2), (1, 1, 1, 1, 1), 64, 4, label_dim=10),
        # The shipped demo models (lego_model/assets, trained by lego_model.digits.train on 16x16 digits).
        LegoConfig("digits_pg_16", (4, 8, 16), (2, 2, 2), (1, 2, 2), 128, 4, img_channels=1, label_dim=10),
        LegoConfig("digits_pr_16", (16, 8, 4), (2, 2, 2), (2, 2, 1), 128, 4, img_channels=1, label_dim=10),
    ]
}


def get_config(name: str) -> LegoConfig:
    """Return the registered config ``name``; an unknown name lists the valid ones."""
    try:
        return LEGO_CONFIGS[name]
    except KeyError:
        raise ConfigError(f"unknown config {name!r}; valid names: {', '.join(LEGO_CONFIGS)}") from None
