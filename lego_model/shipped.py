"""The models shipped inside the package.

Trained by ``python -m lego_model.digits.train``; see assets/MODEL_CARD.md.
"""

from __future__ import annotations

from pathlib import Path

from lego_model.errors import CheckpointError

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = "digits_pg"  # the default model of the quick start, lego-export and runtimes.sample


def shipped_checkpoint(name: str = DEFAULT_MODEL) -> Path:
    """Path of a shipped model's safetensors file."""
    path = ASSETS / f"{name}.safetensors"
    if not path.is_file():
        available = sorted(p.stem for p in ASSETS.glob("*.safetensors") if not p.stem.endswith("_classifier"))
        raise CheckpointError(f"no shipped model {name!r} in {ASSETS}; available: {', '.join(available) or 'none'}")
    return path
