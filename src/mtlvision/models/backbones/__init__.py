"""Backbones: shared trunks (stem -> stages -> pool). One module per family, each registering its
backbones with `@BACKBONES.register(name, params=ParamsDataclass)`; every module here is imported on
first use of the registry."""
from __future__ import annotations

import importlib
import pkgutil

from ...registry import BACKBONES
from .base import Backbone, Normalization, build_backbone

__all__ = ["BACKBONES", "Backbone", "Normalization", "build_backbone"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
