"""Balancing methods: how per-task losses become the single backward pass that trains the network."""
from .base import METHODS, Balancer, StepContext, build_balancer
from . import weighting  # noqa: F401  (registration)

__all__ = ["METHODS", "Balancer", "StepContext", "build_balancer"]
