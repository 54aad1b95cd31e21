"""Balancing methods: how per-task losses become the single backward pass that trains the network.

One method is one module in `methods/` (its solver, parameters, docstring and `@METHODS.register`); every
module there is imported here, so adding a method touches no other file.
"""
import importlib
import pkgutil

from . import methods
from .base import METHODS, Balancer, build_balancer
from .context import Probe, StepContext

for _module in pkgutil.iter_modules(methods.__path__):
    importlib.import_module(f"{methods.__name__}.{_module.name}")

__all__ = ["METHODS", "Balancer", "Probe", "StepContext", "build_balancer"]
