"""Balancing methods: how per-task losses become the single backward pass that trains the network.

Every module in this package is imported here, so a new method is one file with one decorator.
"""
import importlib
import pkgutil

from .base import METHODS, Balancer, StepContext, build_balancer

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Balancer", "StepContext", "build_balancer"]
