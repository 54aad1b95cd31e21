"""Data: sources -> decoded uint8 cache -> batched tensor loaders with on-tensor augmentation."""
from .build import DataBundle, build_data
from .sources import SOURCES, Source, SourceData

__all__ = ["DataBundle", "build_data", "SOURCES", "Source", "SourceData"]
