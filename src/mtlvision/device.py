"""Devices: choosing one from a config value, and reading a process's peak memory on it."""
from __future__ import annotations

from typing import Optional

import torch

from .errors import ConfigError


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """'auto' (a GPU when there is one), 'cpu', 'cuda' or 'cuda:N'; anything else is a ConfigError naming `key`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key}: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name!r} asked for, but no CUDA GPU is available (use auto or cpu)")
    return device


def peak_memory_mb(device: torch.device) -> Optional[float]:
    """Peak memory of this process: allocated GPU memory on CUDA, else the resident set size (RSS)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
