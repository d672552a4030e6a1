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

# Bounds of a config read from a file: far above every published LEGO model (XL: 1152 wide, 1.4e9 parameters,
# 64-pixel bricks), far below what would exhaust a machine before any other check could run.
MAX_PARAMETERS = 10_000_000_000
MAX_BRICKS = 64
MAX_DEPTH = 1024
MAX_SIDE = 8192


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(where: str, key: str, value: Any, low: int, high: int | None = None) -> None:
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"{low} to {high}"
        raise ConfigError(f"{where}: {key} must be an integer {bound}, got {value!r}")


# Guidance scales beyond this saturate every pixel; the authors sample with 1.5 to 4.
MAX_CFG_SCALE = 100.0


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
        # Configs also come from checkpoint metadata and manifests: every field is checked for type and range,
        # and the model's size is bounded, before anything allocates (a hidden size of 2**20 would ask for TBs).
        where = f"config {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"config name must be a non-empty string, got {self.name!r}")
        for key in ("brick_sizes", "patch_sizes", "depths"):
            value = getattr(self, key)
            if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
                raise ConfigError(f"{where}: {key} must be a list of integers, got {value!r}")
            object.__setattr__(self, key, tuple(value))
        n = len(self.brick_sizes)
        if not 0 < n <= MAX_BRICKS or len(self.patch_sizes) != n or len(self.depths) != n:
            raise ConfigError(
                f"{where}: brick_sizes, patch_sizes and depths need one entry per brick, 1 to {MAX_BRICKS} bricks "
                f"(got {len(self.brick_sizes)}, {len(self.patch_sizes)}, {len(self.depths)})"
            )
        for k, (r, p, d) in enumerate(zip(self.brick_sizes, self.patch_sizes, self.depths)):
            if not (0 < p <= r <= MAX_SIDE and r % p == 0 and 0 <= d <= MAX_DEPTH):
                raise ConfigError(
                    f"{where}: brick {k} has size {r}, patch {p}, depth {d}; the size must be a multiple of the "
                    f"patch, at most {MAX_SIDE}, and the depth 0 to {MAX_DEPTH}"
                )
        for key, low in (("hidden_size", 1), ("num_heads", 1), ("img_channels", 1), ("label_dim", 0)):
            _check_int(where, key, getattr(self, key), low)
        _check_int(where, "resolution", self.resolution, 0, MAX_SIDE)
        _check_int(where, "augment_dim", self.augment_dim, 0)
        for key, low, high in (("mlp_ratio", 0.0, None), ("sigma_data", 0.0, None), ("class_dropout_prob", 0, 1)):
            value = getattr(self, key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not (value > low if high is None else low <= value <= high):
                bound = f"> {low}" if high is None else f"in [{low}, {high}]"
                raise ConfigError(f"{where}: {key} must be a finite number {bound}, got {value!r}")
            object.__setattr__(self, key, float(value))  # 4 and 4.0: one config, one fingerprint
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise ConfigError(
                f"{where}: hidden_size {self.hidden_size} must be divisible by num_heads "
                f"{self.num_heads} and by 4 (2-D sin-cos position table)"
            )
        if int(self.hidden_size * self.mlp_ratio) < 1:
            raise ConfigError(f"{where}: hidden_size * mlp_ratio must be at least 1")
        params = self.parameter_count()
        if params > MAX_PARAMETERS:
            raise ConfigError(
                f"{where} describes a model of {params:.3g} parameters, more than the supported {MAX_PARAMETERS:.0e} "
                "(the largest published LEGO model has 1.4e9): the config is corrupt"
            )
        if self.resolution == 0:
            object.__setattr__(self, "resolution", max(self.brick_sizes))
        if self.resolution % self.size_multiple:
            raise ConfigError(f"{where}: resolution {self.resolution} is not a multiple of {self.size_multiple}")

    def parameter_count(self) -> int:
        """Number of parameters and persistent buffers of the model (computed, nothing allocated)."""
        D, C = self.hidden_size, self.img_channels
        inner = int(D * self.mlp_ratio)
        # qkv + proj, fc1 + fc2, adaLN (6D): weights and biases; the LayerNorms have no affine parameters.
        block = (3 * D * D + 3 * D) + (D * D + D) + (2 * D * inner + inner + D) + (6 * D * D + 6 * D)
        total = (256 * D + D) + (D * D + D)  # timestep embedder MLP
        total += self.label_dim * D + D if self.label_dim else 0
        total += self.augment_dim * D + D if self.augment_dim else 0
        for k, (p, depth) in enumerate(zip(self.patch_sizes, self.depths)):
            in_channels = C + 2 + (C if k else 0)
            total += in_channels * p * p * D + D  # patch embedding
            total += self.tile_tokens(k) * D  # position table (a persistent buffer)
            total += depth * block
            total += D * p * p * C + p * p * C + 2 * D * D + 2 * D  # final layer
        return total

    @property
    def num_bricks(self) -> int:
        return len(self.brick_sizes)

    def tile_tokens(self, brick: int) -> int:
        """Tokens in one tile of brick ``brick``, (r_k / p_k)^2: the length of the sequences its attention sees."""
        return (self.brick_sizes[brick] // self.patch_sizes[brick]) ** 2

    @property
    def is_latent(self) -> bool:
        """Whether samples are 4-channel Stable Diffusion latents (the ``_32`` configs) rather than pixels."""
        return self.img_channels == 4

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
        """Raise :class:`ShapeError` unless both sides are positive multiples of every brick size, at most
        :data:`MAX_SIDE` (``--height``/``--width`` take the same range)."""
        m = self.size_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ShapeError(
                f"image size {height}x{width} does not fit {self.name}: height and width must be "
                f"positive multiples of {m} (brick sizes {list(self.brick_sizes)})"
            )
        if max(height, width) > MAX_SIDE:
            raise ShapeError(f"image size {height}x{width}: each side is at most {MAX_SIDE} (--height, --width)")

    def check_guidance(self, cfg_scale: float | None) -> None:
        """Refuse guidance (``cfg_scale`` not None) on an unconditional model, and a scale that is not finite and >= 0.

        0 samples unconditionally, 1 conditionally without guidance, above 1
        with guidance.  A negative scale would push images away from their
        class, which no LEGO or EDM recipe uses: refused as a likely typo.
        Above :data:`MAX_CFG_SCALE` every pixel saturates (and 1e300 does not
        fit the runtime's float32 scale): refused too.
        """
        if cfg_scale is not None:
            refuse_unconditional(self.name, self.label_dim, "guidance (--cfg-scale)")
            if not 0 <= cfg_scale <= MAX_CFG_SCALE:  # NaN fails both comparisons
                raise ConfigError(
                    f"guidance scale {cfg_scale} is outside 0..{MAX_CFG_SCALE:g} (--cfg-scale; 1 = no guidance, "
                    "the authors use 1.5 to 4)"
                )

    def check_class(self, class_idx: int | None) -> None:
        """Refuse a class index this model does not have (None, a random class per seed, always passes)."""
        check_class_index(self.name, self.label_dim, class_idx)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LegoConfig:
        """A config from its JSON form (lists for the per-brick tuples); every field is validated."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(map(str, unknown))}; valid fields: {sorted(fields)}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in d]
        if missing:
            raise ConfigError(f"incomplete config: missing {', '.join(missing)}")
        return cls(**d)


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
        # A tiny latent model (4 channels, as the _32 configs): 8x8 latents, 64x64 images through a VAE.
        LegoConfig("tiny_latent_PG_8", (2, 4, 8), (1, 2, 2), (1, 1, 1), 64, 4, img_channels=4, label_dim=10),
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
