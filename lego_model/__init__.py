"""PyTorch reference of LEGO diffusion (Zheng et al., ICLR 2024): model, EDM sampler, skip plans, checkpoints."""

import itertools as _itertools
import os as _os
import signal as _signal
import sys as _sys

# The project's commands: every one imports this package first (runtimes and export through it), then torch
# (seconds).  A Ctrl-C meanwhile would end in a KeyboardInterrupt traceback; lego_model.cli.one_line_errors,
# where each command's body starts, puts Python's handler back.
_COMMAND_MODULES = {"runtimes", "runtimes.sample", "export", "export.cli"} | {
    f"lego_model.digits.{name}" for name in ("train", "quality", "classifier")
}
_COMMAND_SCRIPTS = {"lego-export"}


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C before a command's body runs: nothing is written yet, so say so in one line and exit 130."""
    _os.write(2, b"interrupted: nothing was written (the command was still starting)\n")
    _os._exit(130)


def _starting_a_command() -> bool:
    """Whether this process is one of the project's commands, importing its packages (not a program importing
    them): ``python -m MODULE`` (while the module is located, ``sys.argv[0]`` is ``"-m"``) or a console script."""
    if _os.path.basename(_sys.argv[0] if _sys.argv else "") in _COMMAND_SCRIPTS:
        return True
    argv = list(getattr(_sys, "orig_argv", ()))
    targets = {b for a, b in _itertools.pairwise(argv) if a == "-m"}
    return _sys.argv[:1] == ["-m"] and bool(targets & _COMMAND_MODULES)


if _starting_a_command() and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)

from lego_model.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from lego_model.configs import LEGO_CONFIGS, LegoConfig, get_config  # noqa: E402
from lego_model.errors import CheckpointError, ConfigError, LegoError, ShapeError, SkipPlanError, TextError  # noqa: E402
from lego_model.model import LegoModel  # noqa: E402
from lego_model.precond import denoise_with_bricks, edm_scalings  # noqa: E402
from lego_model.sampler import Denoiser, StackedRandomGenerator, draw_latents, edm_sample, edm_schedule  # noqa: E402
from lego_model.shipped import shipped_checkpoint  # noqa: E402
from lego_model.skip import SkipPlan  # noqa: E402

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
