"""Model = backbone (shared trunk) + architecture (task-specific sharing) + heads."""
from .architectures import ARCHITECTURES
from .backbones import BACKBONES
from .heads import HEADS
from .model import MultiTaskModel, build_model

__all__ = ["ARCHITECTURES", "BACKBONES", "HEADS", "MultiTaskModel", "build_model"]
