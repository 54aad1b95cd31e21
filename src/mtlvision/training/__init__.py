"""Training: optimiser and schedule, the epoch loop, checkpoints and resume, progress and logs."""
from .trainer import Trainer, train

__all__ = ["Trainer", "train"]
