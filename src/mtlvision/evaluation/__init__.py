"""Evaluation: per-task metrics over a split, and the multi-task gain Δm over single-task baselines."""
from .delta_m import delta_m
from .metrics import TaskMeter

__all__ = ["TaskMeter", "delta_m"]
