"""Training: the composition root (assembly), the epoch loop (trainer), checkpoints, callbacks, the run
end to end with its baselines (run), optimiser and schedule, data parallelism."""
from .run import build_trainer, default_out_dir, train
from .trainer import Trainer

__all__ = ["Trainer", "build_trainer", "default_out_dir", "train"]
