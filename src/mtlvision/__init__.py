"""mtlvision: multi-task image classification with a shared backbone and balanced task losses."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from ._version import __version__
from .config import Config, as_config, load_config
from .errors import CheckpointError, ConfigError, DataError, MTLVisionError, TrainingDiverged
from .inference import Run, load
from .tasks import Task



def train(config: Config | dict[str, Any] | str | os.PathLike, out_dir: Optional[str | os.PathLike] = None,
          resume: bool = False, quiet: bool = False) -> Run:
    """Train a run from a Config, a config dict or a YAML path; returns the loaded Run."""
    from .training import default_out_dir, train as _train

    cfg = as_config(config)
    out = Path(out_dir) if out_dir is not None else default_out_dir(cfg)
    _train(cfg, out, resume=resume, quiet=quiet)
    return Run(out)


__all__ = ["Config", "load_config", "train", "load", "Run", "Task", "MTLVisionError", "ConfigError",
           "DataError", "CheckpointError", "TrainingDiverged", "__version__"]
