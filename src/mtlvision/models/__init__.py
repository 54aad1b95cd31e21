"""Model = backbone (shared trunk) + architecture (task-specific sharing) + heads."""
from .architectures import ARCHITECTURES, Architecture, ModelOutput
from .backbones import BACKBONES, Backbone
from .heads import HEADS
from .model import build_model

__all__ = ["ARCHITECTURES", "Architecture", "ModelOutput", "BACKBONES", "Backbone", "HEADS", "build_model"]
