"""PyTorch reference of LEGO diffusion (Zheng et al., ICLR 2024): model, EDM sampler, skip plans, checkpoints."""

from lego_model.checkpoints import load_checkpoint, save_checkpoint
from lego_model.configs import LEGO_CONFIGS, LegoConfig, get_config
from lego_model.errors import CheckpointError, ConfigError, LegoError, ShapeError, SkipPlanError, TextError
from lego_model.model import LegoModel
from lego_model.precond import denoise_with_bricks, edm_scalings
from lego_model.sampler import Denoiser, StackedRandomGenerator, draw_latents, edm_sample, edm_schedule
from lego_model.shipped import shipped_checkpoint
from lego_model.skip import SkipPlan

__all__ = [
    "LEGO_CONFIGS",
    "CheckpointError",
    "ConfigError",
    "Denoiser",
    "LegoConfig",
    "LegoError",
    "LegoModel",
    "ShapeError",
    "SkipPlan",
    "SkipPlanError",
    "StackedRandomGenerator",
    "TextError",
    "denoise_with_bricks",
    "draw_latents",
    "edm_sample",
    "edm_scalings",
    "edm_schedule",
    "get_config",
    "load_checkpoint",
    "save_checkpoint",
    "shipped_checkpoint",
]
