"""Architectures: how the tasks share the network. One module per family of architectures (moe.py holds
the four mixture-of-experts designs), each registered with `@ARCHITECTURES.register(name,
params=ParamsDataclass)`; every module here is imported on start.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import ARCHITECTURES, Architecture, ModelOutput

__all__ = ["ARCHITECTURES", "Architecture", "ModelOutput"]

# every module in this package registers its architectures: a new one is one file with one decorator
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
